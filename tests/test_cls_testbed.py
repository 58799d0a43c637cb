"""The classification test bed: synthetic_objects, the random baseline,
classification training and the policy sweep, at :runlocal size."""

import colorsys
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lvtp_jax import pruning
from lvtp_jax.data import synthetic_objects as so
from lvtp_jax.evaluation import plots
from lvtp_jax.evaluation import selection
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import classification as cls_train
from tests import tiny_segmenter as tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'quickstart_cls.py')


def _config(arg='runlocal'):
  spec = importlib.util.spec_from_file_location('qcls', CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  config.train.progress = False
  config.eval.progress = False
  return config


# ----------------------------------------------------------------------------
# synthetic_objects.
# ----------------------------------------------------------------------------


def test_examples_are_reproducible_and_splits_differ():
  val = so.ObjectsSource('validation')
  a, b = val[5], val[5]
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].shape == (64, 64, 3) and a['image'].dtype == np.uint8
  other = so.ObjectsSource('selection')[5]
  assert not np.array_equal(a['image'], other['image'])
  assert len(val) == 2000
  labels = [val[i]['label'] for i in range(200)]
  assert set(labels) == set(range(so.NUM_CLASSES))
  with pytest.raises(ValueError, match='no split'):
    so.ObjectsSource('test')
  with pytest.raises(ValueError, match='unknown synthetic_objects difficulty'):
    so.open_source('train', {'colour': 1})


def test_the_label_is_the_colour_of_the_checkered_target():
  source = so.ObjectsSource('validation')
  hits = 0
  for i in range(50):
    example = source[i]
    cy, cx, r = example['target']
    yy, xx = np.mgrid[0:64, 0:64]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.6 * r) ** 2
    pixels = example['image'][inside].astype(np.float32) / 255.0
    # The darker checks carry the colour itself (the others are lightened).
    dark = pixels[pixels.sum(-1) <= np.median(pixels.sum(-1))]
    hue = np.median([colorsys.rgb_to_hsv(*p)[0] for p in dark])
    nearest = int(np.round(hue * so.NUM_CLASSES)) % so.NUM_CLASSES
    hits += nearest == example['label']
    # Textured: the checks alternate between two colours.
    assert pixels.std(axis=0).max() > 0.05
  assert hits >= 45   # hue jitter moves a few across a class boundary


def _nearest_class(pixels):
  hue = np.median([colorsys.rgb_to_hsv(*p)[0] for p in pixels])
  return int(np.round(hue * so.NUM_CLASSES)) % so.NUM_CLASSES


@pytest.mark.parametrize('chain', [1, 3])
def test_the_lookup_label_is_where_the_walk_from_the_marker_ends(chain):
  d = so.Difficulty(chain=chain, hue_jitter=0.015)
  source = so.ObjectsSource('validation', d)
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
  hits = total = 0
  for i in range(40):
    example = source[i]
    # The same draws as the generator: the background, then the layout.
    rng = np.random.default_rng((source.seed, i))
    so._background(rng, d, yy, xx)  # pylint: disable=protected-access
    layout = so.lookup_layout(rng, d)
    keys = [k for _, _, k, _ in layout['pairs']]
    assert len(set(keys)) == len(keys)
    assert d.pairs[0] <= len(keys) < d.pairs[1]
    cells = [(r, c) for r, c, _, _ in layout['pairs']]
    cells.append(layout['marker'][:2])
    assert len(set(cells)) == len(cells)
    assert all(0 <= r < 8 and 0 <= c < 8 for r, c in cells)
    # Walk: from the marker's colour, `chain` times to the value of the key
    # of that colour.
    cls = layout['marker'][2]
    for _ in range(chain):
      (cls,) = [v for _, _, k, v in layout['pairs'] if k == cls]
    assert cls == example['label'] == layout['label']
    # The pixels: a card's frame carries its key's colour, its centre its
    # value's; the marker is checkered; the target is the walk's last card.
    image = example['image'].astype(np.float32) / 255.0
    total += 2 * len(layout['pairs'])
    for r, c, key, value in layout['pairs']:
      card = image[8 * r:8 * r + 8, 8 * c:8 * c + 8]
      frame = np.concatenate([card[:2].reshape(-1, 3),
                              card[6:].reshape(-1, 3),
                              card[2:6, :2].reshape(-1, 3),
                              card[2:6, 6:].reshape(-1, 3)])
      hits += _nearest_class(frame) == key
      hits += _nearest_class(card[2:6, 2:6].reshape(-1, 3)) == value
    r, c, _ = layout['marker']
    assert image[8 * r + 1:8 * r + 7, 8 * c + 1:8 * c + 7].std(
        axis=(0, 1)).max() > 0.05
    r, c = layout['path'][-1]
    np.testing.assert_allclose(example['target'],
                               [8 * r + 4, 8 * c + 4, 2.0])
  assert hits >= 0.95 * total   # hue jitter moves a few across a class
  with pytest.raises(ValueError, match='chain=-1'):
    so.Difficulty(chain=-1)
  with pytest.raises(ValueError, match='pairs='):
    so.Difficulty(chain=4, pairs=(3, 6))


def test_the_config_picks_the_task():
  # The test bed is the one-lookup task with a card per patch; chain=0 is
  # the earlier colour task, with the dataset's own defaults.
  for arg, chain in (('', 1), ('chain=2', 2), ('chain=0', 0)):
    config = _config(arg)
    d = so.Difficulty(**config.data.difficulty.to_dict())
    assert d.chain == chain
    if chain:
      assert d.cell == config.model.patch_size and d.hue_jitter == 0.015
    else:
      assert d == so.Difficulty()
  with pytest.raises(ValueError, match='chain=-1'):
    _config('chain=-1')


def test_train_batches_resume_where_they_stopped():
  source = so.ObjectsSource('train')
  kwargs = dict(batch_size=4, mean=so.MEAN, std=so.STD, num_threads=2)
  first = so.train_batches(source, start_step=0, **kwargs)
  run = [next(first) for _ in range(3)]
  first.close()
  resumed = so.train_batches(source, start_step=2, **kwargs)
  np.testing.assert_array_equal(next(resumed)['image'], run[2]['image'])
  resumed.close()
  want = (source[8]['image'].astype(np.float32) / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(run[2]['image'][0], want, atol=1e-6)
  assert run[2]['label'][0] == source[8]['label']


# ----------------------------------------------------------------------------
# The random baseline.
# ----------------------------------------------------------------------------

_TINY = vit_lib.create_vit('Ti/16', img_size=64, num_classes=10)
_PARAMS = tiny.random_params(_TINY, x_shape=(1, 64, 64, 3), scale=0.05)


def _run(cfg, x):
  model = pruning.attach(_TINY, cfg)
  return model.apply({'params': _PARAMS}, x, return_aux=True)


def test_random_drop_has_evits_counts_and_averages_the_dropped_tokens():
  x = np.asarray(tiny.images(4, batch=3)).repeat(2, axis=1).repeat(2, axis=2)
  _, rand = _run(dict(name='random_drop', mode='buffer',
                      random_drop=dict(keep_rate=0.5)), x)
  _, evit = _run(dict(name='evit', mode='buffer', evit=dict(keep_rate=0.5)),
                 x)
  np.testing.assert_array_equal(rand['valid_tokens'], evit['valid_tokens'])
  np.testing.assert_array_equal(rand['mlp_tokens'], evit['mlp_tokens'])
  src, size = np.asarray(rand['state'].src), np.asarray(rand['state'].size)
  assert (src >= 1).all()   # every patch is kept or in the fused token
  for b in range(3):
    owned = np.bincount(src[b], minlength=size.shape[1])
    np.testing.assert_array_equal(owned[1:], size[b, 1:])
  # Seeded: the same draw twice, another with another seed; masked == buffer.
  again = _run(dict(name='random_drop', mode='buffer',
                    random_drop=dict(keep_rate=0.5)), x)[1]
  np.testing.assert_array_equal(again['state'].src, src)
  other = _run(dict(name='random_drop', mode='buffer',
                    random_drop=dict(keep_rate=0.5, seed=1)), x)[1]
  assert not np.array_equal(other['state'].src, src)
  masked = _run(dict(name='random_drop', mode='masked',
                     random_drop=dict(keep_rate=0.5)), x)
  buffer = _run(dict(name='random_drop', mode='buffer',
                     random_drop=dict(keep_rate=0.5)), x)
  np.testing.assert_allclose(masked[0], buffer[0], atol=1e-5)


def test_random_drop_fuses_the_mean_of_the_dropped_tokens():
  from lvtp_jax.pruning.policies import random_drop  # pylint: disable=g-import-not-at-top
  from lvtp_jax.pruning import registry  # pylint: disable=g-import-not-at-top
  from lvtp_jax.tokens import state as ts  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
  state = ts.TokenState(x=x, valid=jnp.ones((2, 9), bool),
                        size=jnp.ones((2, 9)),
                        src=jnp.broadcast_to(jnp.arange(1, 9), (2, 8)))
  policy = random_drop.RandomDrop()
  params = policy.make_params(policy.config_defaults(), 0)
  ctx = registry.ReduceContext(layer=4, n_out=1 + 6 + 1, num_prefix=1,
                               state=state, signals={})
  out = policy.reduce(ctx, params)
  kept = out.x[:, 1:7]
  for b in range(2):
    rows = [i for i in range(1, 9)
            if not any(np.allclose(x[b, i], k) for k in kept[b])]
    assert len(rows) == 2
    np.testing.assert_allclose(out.x[b, 7], np.mean(x[b, rows], axis=0),
                               atol=1e-6)


# ----------------------------------------------------------------------------
# Training, evaluation, the sweep and the fine-tune, at :runlocal size.
# ----------------------------------------------------------------------------


def test_runlocal_trains_sweeps_and_fine_tunes(tmp_path):
  base = str(tmp_path / 'base')
  config = _config('runlocal,sweep=policies')
  out = cls_train.train_and_evaluate(config, base)
  rows = {r['name']: r for r in out['rows']}
  assert list(rows) == ['none', 'evit0.7', 'gtp_P3']
  for row in rows.values():
    assert 0.0 <= row['top1'] <= 100.0 and row['num_images'] == 16
    assert row['gflops_realized'] > 0 and row['images_per_second'] > 0
    assert row['weights'].endswith('/checkpoints/4')
    assert len(row['tokens_per_block']) == 12
  assert rows['none']['tokens_per_block'] == [65.0] * 12
  # EViT 0.7 at blocks 4, 7, 10 (1-based): 64 -> 45 (+1 fused) -> ...
  assert rows['evit0.7']['tokens_per_block'][3] == 65.0
  assert rows['evit0.7']['mlp_tokens_per_block'][3] == 1 + 45 + 1
  # GTP propagates 3 patches in every block.
  assert rows['gtp_P3']['mlp_tokens_per_block'] == [65.0 - 3 * (i + 1)
                                                    for i in range(12)]
  for name in ('evit0.7', 'gtp_P3'):
    assert rows[name]['gflops_effective'] < rows['none']['gflops_effective']
  for png in ('pareto_top1.png', 'token_maps.png'):
    assert os.path.getsize(os.path.join(base, png)) > 1000
  lines = [json.loads(l) for l in open(os.path.join(base, 'metrics.jsonl'))]
  assert any('eval_top1' in l for l in lines)
  assert all(np.isfinite(l['loss']) for l in lines if 'loss' in l)

  # (eval.py on a workdir scores its newest intact checkpoint:
  # tests/test_faults.py.)

  # The held-out selection protocol: picks on 'selection', reported once on
  # validation with paired intervals.
  chosen = selection.run_classification(config, base, 'selection', [0.2],
                                        resamples=200)
  (pick_evit, pick_gtp) = [p for p in chosen['picks'] if p['name']]
  assert (pick_evit['name'], pick_gtp['name']) == ('evit0.7', 'gtp_P3')
  assert [r['name'] for r in chosen['rows']] == [
      'unpruned', 'pick/evit0.7', 'pick/gtp_P3']
  assert all(r['dataset'].endswith(':selection') for r in chosen['grid_rows'])
  assert all(r['dataset'].endswith(':validation') for r in chosen['rows'])
  (pair,) = chosen['paired']
  assert pair['top1']['low'] <= pair['top1']['diff'] <= pair['top1']['high']
  for name in ('picks.json', 'paired.json', 'results.json'):
    assert os.path.exists(os.path.join(base, 'selection', name))

  # EViT's protocol: a fine-tune from the base run with the policy live.
  tuned = _config(f'runlocal,finetune=0.7,base={base}')
  out = cls_train.train_and_evaluate(tuned, str(tmp_path / 'ft'))
  (row,) = out['rows']
  assert row['name'] == 'evit0.7_ft' and row['policy'] == 'evit'
  assert row['tokens_per_block'] == rows['evit0.7']['tokens_per_block']


def test_training_errors_name_the_problem(tmp_path):
  config = _config()
  config.data.name = 'imagenet2012'
  with pytest.raises(ValueError, match='reads the built-in'):
    cls_train.train(config, str(tmp_path / 'a'))
  config = _config()
  config.pruning.name = 'dtop'
  with pytest.raises(ValueError, match='exits tokens at auxiliary heads'):
    cls_train.train(config, str(tmp_path / 'b'))
  config = _config()
  config.model.img_size = 32
  with pytest.raises(ValueError, match='set data.difficulty.size'):
    cls_train.train(config, str(tmp_path / 'c'))
  config = _config()
  config.model.patch_size = 16
  with pytest.raises(ValueError, match='set data.difficulty.cell'):
    cls_train.train(config, str(tmp_path / 'd'))


def test_token_groups():
  src = np.array([1, 1, 2, -1, 3, 3, 3, 4, 5])
  np.testing.assert_array_equal(
      plots.token_groups(src, (3, 3)),
      [[1, 1, -2], [-1, 3, 3], [3, -2, -2]])


def test_diagnostic_rows_stay_off_the_plots(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(plots, 'pareto',
                      lambda rows, path, metric, **kw: seen.append(
                          [r['name'] for r in rows]) or path)
  rows = [dict(name='none', policy='none', top1=50.0, gflops_effective=1.0),
          dict(name='evit0.7', policy='evit', top1=49.0,
               gflops_effective=0.7),
          dict(name='evit0.25@1', policy='evit', top1=40.0,
               gflops_effective=0.3, in_plots=False)]
  plots.write_figures(str(tmp_path), rows, None)
  assert seen == [['none', 'evit0.7']]


def test_one_plot_from_a_base_run_and_its_fine_tunes(tmp_path):
  base = [dict(name='none', policy='none', top1=50.0, gflops_effective=1.0),
          dict(name='evit0.7', policy='evit', top1=49.0,
               gflops_effective=0.7),
          dict(name='pick/evit0.7', policy='evit', top1=49.0,
               gflops_effective=0.7)]
  tuned = [dict(name='evit0.7_ft', policy='evit', top1=49.6,
                gflops_effective=0.7, family='evit (fine-tuned)'),
           dict(name='none', policy='none', top1=50.2, gflops_effective=1.0)]
  # The fine-tunes' control: the same steps, unpruned, as its own family.
  control = [dict(name='none_ft', policy='none', top1=50.4,
                  gflops_effective=1.0, family='none (fine-tuned)')]
  paths = []
  for i, rows in enumerate((base, tuned, control)):
    paths.append(str(tmp_path / f'{i}.json'))
    with open(paths[-1], 'w') as f:
      json.dump(dict(rows=rows), f)
  merged = plots.merged_rows(paths)
  assert [r['name'] for r in merged] == ['none', 'evit0.7', 'evit0.7_ft',
                                         'none_ft']
  assert plots.main(paths + ['--out', str(tmp_path / 'out')]) == 0
  assert os.path.getsize(tmp_path / 'out' / 'pareto_top1.png') > 1000
