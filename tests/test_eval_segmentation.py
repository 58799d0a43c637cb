"""eval.py for segmentation on a prepared synthetic_scenes/tiny, end to end."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import eval as eval_main
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.data import synthetic_scenes
from lvtp_jax.evaluation import plots
from lvtp_jax.evaluation import segmentation as seg_eval
from lvtp_jax.evaluation import segmentation_metrics
from lvtp_jax.evaluation import table
from lvtp_jax.measure import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'segmenter_eval.py')
NUM = 6


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  synthetic_scenes.prepare(path, config='tiny')
  return path


def _config(data_dir, **eval_overrides):
  spec = importlib.util.spec_from_file_location('segcfg', CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config('dataset=synthetic_scenes,runlocal')
  config.data.name = 'synthetic_scenes/tiny'
  config.data.data_dir = data_dir
  config.data.num_examples = NUM
  config.data.batch_size = 4          # 6 images: the last batch is padded
  config.eval.random_weights = True
  config.model.variant = 'Ti/16'
  config.model.decoder = 'linear'
  config.eval.progress = False
  config.eval.update(eval_overrides)
  return config


def test_whole_image_eval_writes_a_consistent_row(data_dir, tmp_path):
  config = _config(data_dir)
  out = eval_main.run(config, str(tmp_path))
  assert json.load(open(tmp_path / 'results.json')) == json.loads(
      json.dumps(out))
  (row,) = out['rows']
  for key in ('miou', 'boundary_miou', 'pixel_accuracy', 'gflops_realized',
              'gflops_effective', 'images_per_second', 'tokens_per_stage'):
    assert key in row, key
  assert row['policy'] == 'none' and row['num_images'] == NUM
  assert row['tokens_per_stage'] == [65.0]    # 8 x 8 patches + CLS

  # The same images through a plain per-image loop give the same metrics:
  # batching, padding and masks change nothing.
  model, params, prep, _ = seg_eval.build_model(config)
  source = segmentation_datasets.open_segmentation_source(
      'synthetic_scenes/tiny', 'validation', data_dir)
  metrics = segmentation_metrics.SegmentationMetrics(model.num_classes)
  for i in range(NUM):
    ex = source[i]
    image = (ex['image'].astype(np.float32) / 255 - np.array(prep['mean'])) / (
        np.array(prep['std']))
    logits = model.apply({'params': params}, jnp.asarray(image[None],
                                                         jnp.float32))
    metrics.update(np.asarray(jnp.argmax(logits, -1))[0], ex['segmentation'])
  want = metrics.result()
  assert row['miou'] == pytest.approx(want['miou'], abs=1e-6)
  assert row['boundary_miou'] == pytest.approx(want['boundary_miou'], abs=1e-6)

  effective = 2 * flops.segmenter_macs(model, (128, 128)) / 1e9
  assert row['gflops_effective'] == pytest.approx(effective)
  assert 1.0 < row['gflops_realized'] / effective < 1.15
  assert row['images_per_second'] > 0


def test_one_window_slide_equals_whole(data_dir, tmp_path):
  whole = eval_main.run(_config(data_dir), str(tmp_path / 'w'))['rows'][0]
  slide = eval_main.run(
      _config(data_dir, mode='slide', short_size=128, long_max=128,
              window=128, stride=128), str(tmp_path / 's'))['rows'][0]
  assert slide['inference']['windows_per_image'] == 1.0
  assert slide['miou'] == pytest.approx(whole['miou'], abs=1e-4)
  assert slide['gflops_effective'] == pytest.approx(whole['gflops_effective'])


def test_bad_configs_fail_clearly(data_dir, tmp_path):
  config = _config(data_dir)
  config.model.num_classes = 3
  with pytest.raises(ValueError, match=f'has {len(synthetic_scenes.CLASS_NAMES)}'
                     ' classes but the model'):
    eval_main.run(config, str(tmp_path))
  config = _config(data_dir, mode='tiles')
  with pytest.raises(ValueError, match='config.eval.mode'):
    eval_main.run(config, str(tmp_path))
  config = _config(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='synthetic_scenes'):
    eval_main.run(config, str(tmp_path))


def test_pruned_settings_in_slide_mode(data_dir, tmp_path):
  """Decisions per window; token statistics over the real windows only."""
  config = _config(data_dir, mode='slide', short_size=128, long_max=128,
                   window=64, stride=32, exit_maps=2)
  config.model.aux_layers = (4, 8)
  dtop = {'pruning.name': 'dtop', 'pruning.dtop.threshold': 0.12}
  config.sweep = (
      {'eval.name': 'unpruned'},
      dict(dtop, **{'eval.name': 'dtop_p1', 'pruning.dtop.threshold': 1.0}),
      dict(dtop, **{'eval.name': 'dtop'}),
      dict(dtop, **{'eval.name': 'dtop/buffer', 'pruning.mode': 'buffer',
                    'pruning.calibrate.images': 2,
                    'pruning.calibrate.quantile': 0.5}))
  out = eval_main.run(config, str(tmp_path))
  unpruned, never, masked, buffered = out['rows']
  # 128 px images, windows of 64 at stride 32: 3 x 3 windows, 4 + 1 + 4
  # in three batches of 4 (the last one padded).
  for row in out['rows'][1:]:
    assert row['forwards'] == NUM * 9
  # p0 = 1.0 exits nothing: the unpruned numbers.
  assert never['miou'] == pytest.approx(unpruned['miou'], abs=1e-6)
  assert never['gflops_effective'] == pytest.approx(
      unpruned['gflops_effective'])
  assert never['exit_fraction_per_stage'] == [0.0, 0.0]
  assert masked['gflops_effective'] < unpruned['gflops_effective']
  assert sum(masked['exit_fraction_per_stage']) > 0.1
  assert masked['tokens_per_stage'][0] == 17.0           # 4 x 4 + CLS
  assert masked['stage_starts'] == [0, 4, 8]
  assert masked['params']['threshold'] == 0.12
  assert masked['params']['mode'] == 'masked'
  assert buffered['calibration'] == dict(split='train', images=2,
                                         forwards=18, quantile=0.5)
  caps = buffered['params']['capacities']
  assert len(caps) == 2 and caps[0] >= caps[1]
  assert buffered['capacity_per_stage'][1:] == [
      int(np.ceil(round(c * 16, 6))) + 1 for c in caps]
  assert buffered['gflops_realized'] < unpruned['gflops_realized']
  assert buffered['realized_flop_ratio'] > 1.0
  assert buffered['overflow_forwards'] <= buffered['forwards']
  assert 0 < buffered['decision_share'] < 0.05
  # Figures: the Pareto plots and exit maps of the pruned settings.
  for name in ('pareto_miou.png', 'pareto_boundary_miou.png',
               'exit_maps.png'):
    assert os.path.getsize(tmp_path / name) > 1000


def test_pareto_front_and_off_scale_rows(tmp_path):
  from lvtp_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  pts = [(0.3, 40.0), (0.2, 39.0), (0.25, 38.0), (0.2, 39.0), (0.35, 40.0),
         (0.1, 30.0)]
  # (0.25, 38) is beaten by (0.2, 39); (0.35, 40) costs more than (0.3, 40);
  # of the two equal (0.2, 39) points both stay (neither beats the other).
  assert plots.front(pts) == [5, 1, 3, 0]
  rows = [dict(name='unpruned', policy='none', gflops_effective=0.4,
               miou=42.0)]
  rows += [dict(name=f'a{i}', policy='a', gflops_effective=x, miou=y)
           for i, (x, y) in enumerate(pts)]
  path = plots.pareto(rows, str(tmp_path / 'p.png'))
  assert os.path.getsize(path) > 1000


def test_in_block_reductions_on_the_segmenter_give_rows(data_dir, tmp_path,
                                                       monkeypatch):
  """EViT and ToMe on the Segmenter (dense reassembly through src): rows
  with the token counts of every block and MLP, and effective GFLOPs from
  them; the linear decoder is per token, so its cost stays that of N. Their
  merge maps (and the composed policy's exits) are drawn."""
  config = _config(data_dir)
  config.model.depth = 4             # Ti/16 otherwise: compiling is the cost
  config.eval.exit_maps = 2
  drawn = {}
  real_maps = plots.exit_maps
  monkeypatch.setattr(plots, 'exit_maps', lambda visuals, path, **kw: (
      drawn.update(visuals['maps']), real_maps(visuals, path, **kw))[1])
  config.sweep = (
      {'eval.name': 'unpruned'},
      {'eval.name': 'tome', 'pruning.name': 'tome', 'pruning.mode': 'buffer',
       'pruning.tome.r': 3},
      {'eval.name': 'evit', 'pruning.name': 'evit', 'pruning.mode': 'buffer',
       'pruning.evit.keep_rate': 0.5, 'pruning.evit.layers': (4,)},
      # Composed: ToMe in blocks 1-2, DToP exits after block 3 (the final
      # head on intermediate tokens: this model has no auxiliary heads).
      {'eval.name': 'dtop+tome', 'pruning.name': 'dtop+tome',
       'pruning.mode': 'buffer', 'pruning.tome.r': 3,
       'pruning.aux_source': 'final_head_on_intermediate',
       'pruning.layers': (3,), 'pruning.dtop.threshold': 0.0})
  unpruned, tome, evit, composed = eval_main.run(config,
                                                 str(tmp_path))['rows']
  model = seg_eval.build_model(config)[0]
  assert tome['tokens_per_block'] == [65.0 - 3 * i for i in range(4)]
  assert tome['mlp_tokens_per_block'] == [62.0 - 3 * i for i in range(4)]
  want = 2 * flops.segmenter_effective_macs(
      model, np.asarray(tome['tokens_per_block']) - 1,
      np.asarray(tome['mlp_tokens_per_block']) - 1) / 1e9
  assert tome['gflops_effective'] == pytest.approx(float(want))
  for row in (tome, evit):
    assert row['gflops_effective'] < unpruned['gflops_effective']
    assert row['dense'] == 'source' and 0 <= row['miou'] <= 100
    assert row['speedup'] > 0 and row['realized_flop_ratio'] > 1
  assert evit['mlp_tokens_per_block'][3] == 1 + 32 + 1   # 64 -> 32 + fused
  assert composed['policy'] == 'dtop+tome'
  assert composed['params']['tome']['r'] == 3
  assert composed['tokens_per_block'][:3] == [65.0, 62.0, 59.0]
  assert composed['tokens_per_block'][3] < 59.0      # exits after block 3
  assert composed['mlp_tokens_per_block'][:2] == [62.0, 59.0]
  assert composed['overflow_tokens'] == 0 and composed['speedup'] > 0
  assert composed['gflops_effective'] < tome['gflops_effective']
  # Merge maps: the final slot of every patch; ToMe's 64 patches share 52
  # slots, so some share one.
  assert sorted(drawn) == ['dtop+tome', 'evit', 'tome']
  for m in drawn['tome']:
    assert m['exit_stage'] is None and m['src'].shape == (64,)
    assert len(np.unique(m['src'])) == 64 - 4 * 3
  assert all(m['exit_stage'] is not None and m['src'] is not None
             for m in drawn['dtop+tome'])
  assert os.path.getsize(tmp_path / 'exit_maps.png') > 1000


def test_the_table_reads_the_realized_ratio_under_either_spelling():
  # Rows written before 2026-12-05 spelled it realized_flops_ratio.
  row = dict(name='dtop', policy='dtop', params=dict(mode='buffer'),
             miou=40.0, boundary_miou=30.0, gflops_effective=0.7,
             gflops_realized=0.8, speedup=1.2)
  rows = [dict(name='unpruned', policy='none', miou=41.0, boundary_miou=31.0,
               gflops_effective=1.0, gflops_realized=1.0),
          dict(row, realized_flop_ratio=1.25),
          dict(row, realized_flops_ratio=1.5), row]
  lines = table.markdown(rows).splitlines()
  assert [l.split(' | ')[10] for l in lines[3:]] == ['1.25x', '1.50x',
                                                      '1.00x']
  assert '-1.00' in lines[3] and '30.0%' in lines[3]
