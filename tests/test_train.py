"""Training: optimizer, losses, resume, multi-device, bad input, quickstart."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lvtp_jax.data import synthetic_scenes
from lvtp_jax.train import loop
from lvtp_jax.train import losses
from lvtp_jax.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'configs'))
import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------
# Optimizer and losses (no model).
# ----------------------------------------------------------------------------


def _train_cfg(**kw):
  cfg = optim.config_defaults()
  cfg.update(kw)
  return cfg


def test_schedule_warmup_then_poly():
  cfg = _train_cfg(lr=1.0, end_lr=0.1, power=2.0, warmup_steps=4,
                   num_steps=14)
  sched = optim.make_schedule(cfg)
  # warm-up: t / 4; decay: 0.9 * (1 - (t - 4) / 10) ** 2 + 0.1.
  expected = {0: 0.0, 2: 0.5, 4: 1.0, 9: 0.9 * 0.25 + 0.1, 14: 0.1, 20: 0.1}
  for t, v in expected.items():
    np.testing.assert_allclose(float(sched(t)), v, rtol=1e-6, err_msg=t)


def _one_update(mult, **kw):
  params = {'decoder': {'kernel': jnp.ones((2, 2))},
            'encoder': {'kernel': jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  tx = optim.make_optimizer(_train_cfg(
      optimizer='sgd', lr=0.1, momentum=0.0, num_steps=10, lr_mult=mult,
      lr_mult_regex='^decoder/', **kw))
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_lr_multiplier_scales_matching_params_only():
  base, mult = _one_update(1.0), _one_update(10.0)
  np.testing.assert_allclose(base['decoder']['kernel'], -0.05)
  np.testing.assert_allclose(mult['decoder']['kernel'], -0.5)
  np.testing.assert_allclose(mult['encoder']['kernel'], -0.05)


def test_gradient_clipping():
  # grads 0.5 on 8 entries: global norm sqrt(2); clipped to 0.1.
  clipped = _one_update(1.0, grad_clip_norm=0.1)
  total = optax.global_norm(clipped) / 0.1  # undo lr
  np.testing.assert_allclose(total, 0.1, rtol=1e-6)
  np.testing.assert_allclose(optax.global_norm(_one_update(1.0)) / 0.1,
                             np.sqrt(2.0), rtol=1e-6)


def test_weight_decay_mask():
  params = {'blocks_0': {'fc': {'kernel': jnp.ones((2, 2)),
                                'bias': jnp.ones(2)},
                         'norm': {'scale': jnp.ones(2)}},
            'pos_embed': jnp.ones((1, 3, 2)), 'cls_token': jnp.ones((1, 1, 2))}
  mask = optim.decay_mask(params)
  assert mask['blocks_0']['fc']['kernel']
  assert not any([mask['blocks_0']['fc']['bias'],
                  mask['blocks_0']['norm']['scale'], mask['pos_embed'],
                  mask['cls_token']])


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match='train.lr=0'):
    optim.make_optimizer(_train_cfg(lr=0.0))
  with pytest.raises(ValueError, match='train.optimizer'):
    optim.make_optimizer(_train_cfg(optimizer='lamb'))
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_optimizer(_train_cfg(warmup_steps=10, num_steps=10))


def test_token_targets_majority_and_ignore():
  labels = np.full((1, 4, 4), 255, np.int32)
  labels[0, :2, :2] = [[1, 1], [2, 255]]    # majority 1
  labels[0, :2, 2:] = [[3, 2], [2, 3]]      # tie 2/3 -> 2
  labels[0, 2:, :2] = 0                     # all 0
  targets, valid = losses.token_targets(jnp.asarray(labels), 2, 4)
  np.testing.assert_array_equal(targets[0, :3], [1, 2, 0])
  np.testing.assert_array_equal(valid[0], [True, True, True, False])


def test_pixel_cross_entropy_ignores_255():
  logits = jnp.zeros((1, 1, 2, 4)).at[0, 0, 0, 1].set(5.0)
  labels = jnp.array([[[1, 255]]])
  expected = -jax.nn.log_softmax(logits[0, 0, 0])[1]
  np.testing.assert_allclose(losses.pixel_cross_entropy(logits, labels),
                             expected, rtol=1e-6)


def test_pixel_aux_loss_matches_torch_upsample_and_cross_entropy():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  # A 3x4 grid of patch 4 for 10x14 labels: the last row and column of
  # patches are padded, as in the Segmenter forward.
  token_logits = rng.normal(size=(2, 12, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 10, 14)).astype(np.int32)
  labels[0, :3] = 255
  ours = losses.pixel_cross_entropy(
      losses.upsample_like(jnp.asarray(token_logits), jnp.asarray(labels), 4),
      jnp.asarray(labels))
  grid = torch.from_numpy(token_logits).reshape(2, 3, 4, 5).permute(0, 3, 1, 2)
  up = torch.nn.functional.interpolate(grid, size=(12, 16), mode='bilinear',
                                       align_corners=False)[:, :, :10, :14]
  ref = torch.nn.functional.cross_entropy(
      up, torch.from_numpy(labels).long(), ignore_index=255)
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-5)
  with pytest.raises(ValueError, match='grid'):
    losses.upsample_like(jnp.asarray(token_logits[:, :10]),
                         jnp.asarray(labels), 4)


# ----------------------------------------------------------------------------
# Training runs on synthetic_scenes/tiny.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Persistent XLA cache: the runs below compile the same step repeatedly."""
  path = str(tmp_path_factory.mktemp('xla_cache'))
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (path, 0.0, 0)):
    jax.config.update(n, v)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  synthetic_scenes.prepare(path, config='tiny')
  return path


def _config(data_dir, arg='runlocal', **train):
  config = quickstart.get_config(arg)
  config.data.data_dir = data_dir
  config.train.progress = False
  config.train.update(train)
  return config


def _final_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return state['params']


@pytest.fixture(scope='module')
def quickstart_run(data_dir, tmp_path_factory):
  """The runlocal quickstart, end to end (3 steps, aux head, evaluation)."""
  workdir = str(tmp_path_factory.mktemp('quickstart'))
  # The final evaluation runs the (runlocal) policy comparison.
  out = loop.train_and_evaluate(_config(data_dir, 'runlocal,sweep=policies'),
                                workdir)
  return workdir, out


def test_quickstart_runlocal_end_to_end(quickstart_run):
  workdir, out = quickstart_run
  with open(os.path.join(workdir, 'results.json')) as f:
    written = json.load(f)
  assert written == out
  # The runlocal sweep: the unpruned model, DToP in masked mode and LVTP in
  # buffer mode.
  unpruned, dtop, lvtp = written['rows']
  assert [r['policy'] for r in written['rows']] == ['none', 'dtop', 'lvtp']
  for row in written['rows']:
    assert 0 <= row['miou'] <= 100 and 0 <= row['boundary_miou'] <= 100
    assert row['gflops_effective'] <= unpruned['gflops_effective'] * (1 + 1e-9)
  assert dtop['params']['mode'] == 'masked' and dtop['params']['top_k'] == 5
  assert dtop['capacity_per_stage'] == [65, 65]
  assert lvtp['params']['mode'] == 'buffer'
  assert lvtp['calibration'] == dict(split='train', images=8, forwards=8,
                                     quantile=0.75)
  assert len(lvtp['params']['capacities']) == 1
  assert lvtp['capacity_per_stage'][0] == unpruned['tokens_per_stage'][0]
  for row in (dtop, lvtp):
    assert row['speedup'] > 0 and row['realized_flop_ratio'] > 0
    assert 0 <= row['overflow_forwards'] <= row['forwards']
    assert 0 <= row['decision_share'] < 0.1
    # Patch accuracy of the exited and the remaining patches, pruned vs
    # unpruned: every evaluated patch is in one group.
    acc = row['token_accuracy']
    assert acc['exited']['patches'] + acc['stayed']['patches'] == 8 * 64
  assert lvtp['params']['qs'] == [0.5, 1.0, 2.0]
  for name in ('pareto_miou.png', 'pareto_boundary_miou.png',
               'exit_maps.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  evals = [r for r in lines if 'eval_miou' in r]
  lines = [r for r in lines if 'loss' in r]
  assert [r['step'] for r in lines] == [1, 2, 3]
  # Periodic evaluation at step 2 (eval_every=2), not at the final step 3.
  assert [(r['step'], r['eval_images']) for r in evals] == [(2, 4)]
  assert 0 <= evals[0]['eval_miou'] <= 100
  assert {'loss', 'main_loss', 'aux_loss_1', 'lr',
          'images_per_second'} <= set(lines[0])
  np.testing.assert_allclose(
      lines[0]['loss'], lines[0]['main_loss'] + 0.4 * lines[0]['aux_loss_1'],
      rtol=1e-5)


def test_eval_py_evaluates_the_latest_training_checkpoint(quickstart_run,
                                                         data_dir, tmp_path):
  import eval as eval_main  # pylint: disable=g-import-not-at-top
  workdir, out = quickstart_run
  config = _config(data_dir)
  # Two settings in one call: the model as trained, and at another size.
  config.sweep = ({'eval.name': 'as_trained'},
                  {'eval.name': 'at_96', 'eval.size': 96,
                   'eval.short_size': 96, 'eval.long_max': 96})
  evaluated = eval_main.run(config, workdir)
  # The rows are added to those of the training run.
  assert [r['name'] for r in evaluated['rows']] == [
      r['name'] for r in out['rows']] + ['as_trained', 'at_96']
  rows = evaluated['rows'][-2:]
  assert rows[0]['weights'].endswith('checkpoints/3')
  assert rows[0]['miou'] == pytest.approx(out['rows'][0]['miou'], abs=1e-6)
  assert rows[1]['inference']['size'] == [96, 96]
  assert rows[1]['gflops_effective'] < rows[0]['gflops_effective']

  bad = _config(data_dir)
  bad.model.width = 48
  with pytest.raises(ValueError, match=r'model.width: 32 -> 48'):
    eval_main.run(bad, workdir)
  bad = _config(data_dir)
  bad.sweep = ({'eval.sise': 96},)
  with pytest.raises(ValueError, match=r"sweep\[0\] sets 'eval.sise'"):
    eval_main.run(bad, workdir)
  # The training config asks for random init; evaluation still refuses to
  # score weights nobody trained, naming the workdir (issue 22).
  empty = _config(data_dir)
  assert empty.model.random_init
  with pytest.raises(ValueError, match='nothing to evaluate: .*holds no '
                     'training checkpoint.*eval.random_weights=True'):
    eval_main.run(empty, str(tmp_path))
  with pytest.raises(ValueError, match=r'--workdir \S*typo does not exist'):
    eval_main.run(empty, str(tmp_path / 'typo'))
  assert not (tmp_path / 'typo').exists()


# DToP settings where nothing exits, and where every patch exits at the
# first head.
_EXTREMES = ({'eval.name': 'nothing_exits', 'pruning.name': 'dtop',
              'pruning.dtop.threshold': 1.0},
             {'eval.name': 'all_exit', 'pruning.name': 'dtop',
              'pruning.dtop.threshold': 0.0, 'pruning.dtop.top_k': 0})


def test_loss_split_of_a_pruned_setting(quickstart_run, data_dir):
  from lvtp_jax.evaluation import loss_split  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  config = _config(data_dir)
  config.eval.progress = False
  config.sweep = _EXTREMES
  none, every = loss_split.run(config, workdir, ['nothing_exits', 'all_exit'])
  base = none['unpruned']['miou']
  # Nothing exits: all three ways are the unpruned model.
  for way in loss_split.WAYS:
    np.testing.assert_allclose(none[way]['miou'], base, atol=1e-6)
  # Everything exits at the first head: filling every patch from the
  # unpruned model is the unpruned model, and the exits alone are the model.
  np.testing.assert_allclose(every['oracle_fill']['miou'], base, atol=1e-6)
  np.testing.assert_allclose(every['exit_only']['miou'],
                             every['pruned']['miou'], atol=1e-6)
  assert 'all_exit' in loss_split.format_rows([every])
  with pytest.raises(ValueError, match='not settings of config.sweep'):
    loss_split.run(config, workdir, ['dtop_p0.9'])


def test_paired_bootstrap_of_two_settings(quickstart_run, data_dir):
  from lvtp_jax.evaluation import paired  # pylint: disable=g-import-not-at-top
  from lvtp_jax.evaluation import segmentation  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  config = _config(data_dir)
  config.eval.progress = False
  config.sweep = _EXTREMES
  rows = paired.run(config, workdir, [('nothing_exits', 'all_exit'),
                                      ('all_exit', 'all_exit')],
                    resamples=200)
  # The observed numbers are eval.py's for the same settings.
  config.eval.timing_rounds, config.eval.timing_iters = 1, 1
  want = {r['name']: r for r in segmentation.evaluate(config, workdir)[0]}
  first, same = rows
  assert first['num_images'] == want['all_exit']['num_images']
  for metric in paired.METRICS:
    for side, name in (('a', 'nothing_exits'), ('b', 'all_exit')):
      assert first[metric][side] == pytest.approx(want[name][metric],
                                                  abs=1e-9)
    assert first[metric]['low'] <= first[metric]['high']
    assert same[metric]['diff'] == same[metric]['low'] == 0
  assert first['gflops_b'] == pytest.approx(
      want['all_exit']['gflops_effective'])
  assert first['gflops_b'] < first['gflops_a']
  assert 'all_exit' in paired.format_rows(rows)
  with pytest.raises(ValueError, match='not settings of config.sweep'):
    paired.run(config, workdir, [('nothing_exits', 'dtop_p0.9')])


def test_init_from_a_training_workdir(quickstart_run, data_dir):
  """Phase 2 (pruning fine-tune) starts from the phase-1 workdir."""
  from lvtp_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from lvtp_jax.train import model_init  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  config = _config(data_dir)
  config.model.init_from = workdir
  config.model.drop_path_rate = 0.1
  model, params, prep, initialised = model_init.build(config.model, seed=7)
  _, trained, trained_prep = checkpoint.load_for_eval(workdir, None)
  assert initialised == [] and prep == trained_prep
  assert model.drop_path_rate == 0.1 and model.width == 32
  jax.tree.map(np.testing.assert_array_equal, params, trained)
  # A source of another shape is refused rather than silently replacing
  # the config's (config.json would describe another model).
  config.model.posemb = 'sincos2d'
  with pytest.raises(ValueError, match="model.posemb: 'sincos2d' in the "
                     "config, 'learn' in"):
    model_init.build(config.model, seed=7)
  config.model.posemb = 'learn'
  config.model.width, config.model.depth = 48, 3
  with pytest.raises(ValueError, match=r'(?s)model.depth: 3 in the config, '
                     r'2 in .*model.width: 48 in the config, 32 in'):
    model_init.build(config.model, seed=7)
  config.model.update(dict(variant='', width=0, depth=0, num_heads=0,
                           mlp_dim=0, patch_size=0))
  assert model_init.build(config.model, seed=7)[0].width == 32


def test_segmenter_train_runlocal_with_aux_heads(data_dir, tmp_path):
  """configs/segmenter_train.py end to end: SGD recipe, slide evaluation."""
  import segmenter_train  # pylint: disable=g-import-not-at-top
  config = segmenter_train.get_config('aux=dtop,runlocal')
  config.data.data_dir = data_dir
  config.train.progress = False
  config.eval.progress = False
  out = loop.train_and_evaluate(config, str(tmp_path))
  (row,) = out['rows']
  assert row['inference']['mode'] == 'slide'
  assert row['inference']['windows_per_image'] == 9.0  # 128 px, 64 / 32
  with open(tmp_path / 'metrics.jsonl') as f:
    first = json.loads(f.readline())
  # aux weight 1.0 (DToP weights every head 1.0).
  np.testing.assert_allclose(
      first['loss'], first['main_loss'] + first['aux_loss_1'] +
      first['aux_loss_2'], rtol=1e-5)


class _Killed(Exception):
  pass


def test_resume_after_kill_gives_identical_params(quickstart_run, data_dir,
                                                  tmp_path, monkeypatch):
  reference_dir, _ = quickstart_run
  workdir = str(tmp_path)
  real_batches = loop.seg_data.train_batches

  def killed_after_two(*args, **kwargs):
    it = real_batches(*args, **kwargs)
    yield next(it)
    yield next(it)
    raise _Killed()

  monkeypatch.setattr(loop.seg_data, 'train_batches', killed_after_two)
  with pytest.raises(_Killed):
    loop.train(_config(data_dir), workdir)
  monkeypatch.setattr(loop.seg_data, 'train_batches', real_batches)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  loop.train(_config(data_dir), workdir)  # resumes at step 2
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir, 3),
               _final_params(reference_dir, 3))


def test_checkpoint_of_another_config_is_refused(quickstart_run, data_dir):
  workdir, _ = quickstart_run
  config = _config(data_dir, lr=0.5, num_steps=5)
  config.model.aux_layers = ()
  with pytest.raises(ValueError) as e:
    loop.train(config, workdir)
  message = str(e.value)
  assert 'train.lr: 0.001 -> 0.5' in message
  assert 'model.aux_layers' in message and '--restart' in message
  assert 'num_steps' not in message  # may change on resume


def test_nan_loss_names_step_and_checkpoint(data_dir, tmp_path,
                                           monkeypatch):
  real_batches = loop.seg_data.train_batches

  def poisoned_second_batch(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 1:
        batch['image'][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(loop.seg_data, 'train_batches', poisoned_second_batch)
  with pytest.raises(FloatingPointError,
                     match=r'at step 2; last good checkpoint: step 1 '):
    loop.train(_config(data_dir), str(tmp_path))
  # Nothing after the bad step was saved.
  assert os.listdir(os.path.join(tmp_path, 'checkpoints')) == ['1']


def test_out_of_range_config_values(data_dir, tmp_path):
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    loop.train(_config(data_dir, batch_size=0), str(tmp_path))
  with pytest.raises(ValueError, match='train.num_devices=99'):
    loop.train(_config(data_dir, num_devices=99), str(tmp_path))
  config = _config(data_dir)
  config.model.aux_layers = (2,)
  with pytest.raises(ValueError, match='aux_layers'):
    loop.train(config, str(tmp_path))
  config = _config(data_dir)
  config.train.aux_loss = 'dice'
  with pytest.raises(ValueError, match='train.aux_loss'):
    loop.train(config, str(tmp_path))
  config = _config(data_dir)
  config.data.crop_size = 40
  with pytest.raises(ValueError, match='multiple of the patch size'):
    loop.train(config, str(tmp_path))


_MULTI_DEVICE = r'''
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], 'configs'))
import jax, numpy as np
import quickstart
from lvtp_jax.train import loop
assert jax.device_count() == 4, jax.devices()
out = {}
for n in (1, 4):
  config = quickstart.get_config('runlocal')
  config.data.data_dir = sys.argv[2]
  # SGD: the update is linear in the gradient. Adam's first step is
  # lr * sign(g), which turns reduction-order noise on (near-)zero gradients
  # (e.g. the attention key bias) into lr-sized differences.
  config.train.update(progress=False, num_steps=1, warmup_steps=0,
                      optimizer='sgd', num_devices=n)
  workdir = os.path.join(sys.argv[3], str(n))
  _, params, _ = loop.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    loss = json.loads(f.readline())['loss']
  np.savez(os.path.join(workdir, 'params.npz'),
           *jax.tree.leaves(params))
  out[n] = loss
print(json.dumps(out))
'''


def test_four_devices_equal_one_device(data_dir, tmp_path, compilation_cache):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  proc = subprocess.run(
      [sys.executable, '-c', _MULTI_DEVICE, REPO, data_dir, str(tmp_path)],
      env=env, capture_output=True, text=True, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses_by_n = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(losses_by_n['4'], losses_by_n['1'], atol=1e-5)
  one = np.load(tmp_path / '1' / 'params.npz')
  four = np.load(tmp_path / '4' / 'params.npz')
  assert len(one.files) > 10
  for k in one.files:
    np.testing.assert_allclose(four[k], one[k], atol=1e-5, err_msg=k)


def test_selection_chooses_on_held_out_images_and_reports_on_validation(
    quickstart_run, data_dir):
  from lvtp_jax.evaluation import selection  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  config = _config(data_dir)
  config.eval.progress = False
  # Nothing exits (full cost: fits no cut), everything exits at the first
  # head (the cheapest), and LVTP-R with summaries.
  config.sweep = _EXTREMES + ({'eval.name': 'lvtp_sum', 'pruning.name': 'lvtp',
                               'pruning.exit_summary': 'per_class'},)
  with pytest.raises(ValueError, match='held-out'):
    selection.run(config, workdir, 'validation', [0.3], 'boundary_miou')
  # All exit: a 25% cut on this 2-block model; LVTP-R: less than 20%.
  out = selection.run(config, workdir, 'selection', [0.2, 0.5],
                      'boundary_miou', buffer=True)
  grid = {r['name']: r for r in out['grid_rows']}
  assert sorted(grid) == ['all_exit', 'lvtp_sum', 'nothing_exits', 'unpruned']
  for row in grid.values():
    # The tiny config's 8 held-out images, not validation's.
    assert row['dataset'] == 'synthetic_scenes/tiny:selection'
    assert row['num_images'] == 8
  with open(os.path.join(workdir, 'selection', 'results.json')) as f:
    assert {r['name'] for r in json.load(f)['rows']} == set(grid)
  # The pick is the best boundary mIoU of the settings at most (1 - cut) of
  # the unpruned cost on the selection split, recomputed from its rows.
  full = grid['unpruned']['gflops_effective']
  assert len(out['picks']) == 4
  for pick in out['picks']:
    fits = [r for r in grid.values() if r['policy'] == pick['policy']
            and r['gflops_effective'] <= (1 - pick['cut']) * full]
    if fits:
      assert pick['value'] == max(r['boundary_miou'] for r in fits)
    else:
      assert pick['name'] is None
  assert [p['name'] for p in out['picks']] == ['all_exit', None, None, None]
  # Evaluated on validation as it was configured, masked and buffer.
  with open(os.path.join(workdir, 'results.json')) as f:
    rows = {r['name']: r for r in json.load(f)['rows']}
  picked, buffered = rows['pick/all_exit'], rows['pick/all_exit/buffer']
  for row in (picked, buffered):
    assert row['dataset'] == 'synthetic_scenes/tiny:validation'
    assert row['selection']['setting'] == 'all_exit'
    assert row['selection']['split'] == 'selection'
    assert row['selection']['cuts'] == [0.2]
    assert row['params']['threshold'] == 0.0 and row['params']['top_k'] == 0
  assert picked['params']['mode'] == 'masked'
  assert buffered['params']['mode'] == 'buffer'
  # The same setting through eval.py on validation gives the same row.
  import eval as eval_main  # pylint: disable=g-import-not-at-top
  direct = _config(data_dir)
  direct.eval.progress = False
  direct.sweep = (dict(_EXTREMES[1], **{'eval.name': 'all_exit_direct'}),)
  row = eval_main.run(direct, workdir)['rows'][-1]
  assert row['miou'] == pytest.approx(picked['miou'], abs=1e-9)
  assert row['gflops_effective'] == pytest.approx(picked['gflops_effective'])
  assert '| 20% | dtop | all_exit |' in out['table']
  assert '| 50% | lvtp | none this cheap |' in out['table']
  assert not any(name.startswith('pick/lvtp') for name in rows)
  with open(os.path.join(workdir, 'selection', 'picks.json')) as f:
    assert json.load(f)['picks'] == out['picks']
  # The picks' exit maps (masked mode only).
  assert os.path.getsize(os.path.join(workdir, 'selection',
                                      'exit_maps.png')) > 1000
  # Choosing again at another cut reuses the grid rows (timings included:
  # nothing was evaluated again).
  again = selection.run(config, workdir, 'selection', [0.1], 'miou',
                        buffer=False, reuse_grid=True)
  assert again['grid_rows'] == out['grid_rows']
  assert [p['cut'] for p in again['picks']] == [0.1, 0.1]


def test_block_probe_on_the_trained_quickstart(quickstart_run, data_dir):
  """block_probe: a linear probe per block and the model's own heads, scored
  on the same patches; the decoder's score equals the forward's token
  logits against a direct count of each patch's majority label."""
  from lvtp_jax.evaluation import block_probe  # pylint: disable=g-import-not-at-top
  from lvtp_jax.evaluation import segmentation as seg_eval  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  config = _config(data_dir)
  out = block_probe.run(config, workdir, train_images=8, eval_images=8,
                        steps=20, blocks=(1, 2))
  model, params, prep, _ = seg_eval.build_model(config, workdir)
  names = [r['name'] for r in out['rows']]
  assert names == ['probe after block 1', 'probe after block 2'] + [
      f'aux head {k}' for k in model.aux_layers] + ['final decoder']
  assert all(0.0 <= r['token_accuracy'] <= 1.0 for r in out['rows'])
  # The decoder's row, recomputed: majority labels by a plain loop.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(
      'synthetic_scenes/tiny', split=config.data.split, data_dir=data_dir)
  p = model.patch_size
  mean = np.asarray(prep['mean']) * 255
  std = np.asarray(prep['std']) * 255
  hits = total = 0
  for i in range(8):
    ex = source[i]
    img = (ex['image'].astype(np.float32) - mean) / std
    _, aux = model.apply({'params': params}, img[None], return_aux=True)
    pred = np.asarray(aux['token_logits'][0]).argmax(-1)
    seg = ex['segmentation'][..., 0]
    gw = seg.shape[1] // p
    for n, q in enumerate(pred):
      cell = seg[(n // gw) * p:(n // gw + 1) * p, (n % gw) * p:(n % gw + 1) * p]
      counts = np.bincount(cell.ravel(), minlength=256)[:model.num_classes]
      if counts.max() > 0:
        hits += int(q == counts.argmax())
        total += 1
  assert out['eval_patches'] == total
  assert out['rows'][-1]['token_accuracy'] == pytest.approx(hits / total)
  # Heads only: the same heads' scores, no probes, no training images.
  heads = block_probe.run(config, workdir, train_images=8, eval_images=8,
                          steps=20, probes=False)
  assert heads['rows'] == out['rows'][2:] and heads['train_patches'] == 0


def test_block_probe_scores_per_distance_along_the_paths():
  """accuracy_by_steps groups the patches by chain steps (off-tube patches
  apart) and counts hits per group, as a plain loop does."""
  from lvtp_jax.evaluation import block_probe  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  steps = rng.integers(-1, 16, 500)
  labels = rng.integers(0, 4, 500)
  preds = {'a': rng.integers(0, 4, 500), 'b': labels.copy()}
  rows = block_probe.accuracy_by_steps(preds, labels, steps)
  assert [r['name'] for r in rows] == ['a', 'b']
  groups = {'off tubes': lambda s: s < 0, 'steps 0-2': lambda s: 0 <= s <= 2,
            'steps 3-5': lambda s: 3 <= s <= 5,
            'steps 6-8': lambda s: 6 <= s <= 8,
            'steps 9-11': lambda s: 9 <= s <= 11,
            'steps 12+': lambda s: s >= 12}
  assert list(rows[0]['patches']) == list(groups)
  for g, member in groups.items():
    idx = [i for i in range(500) if member(steps[i])]
    assert rows[0]['patches'][g] == len(idx)
    hits = sum(int(preds['a'][i] == labels[i]) for i in idx)
    assert rows[0]['token_accuracy'][g] == pytest.approx(hits / len(idx))
    assert rows[1]['token_accuracy'][g] == 1.0
  # An empty group has no accuracy rather than a division by zero.
  none = block_probe.accuracy_by_steps(preds, labels, np.full(500, -1))
  assert none[0]['token_accuracy']['steps 12+'] is None
  # Other groups, one step at a time where asked.
  buckets = block_probe.parse_buckets('0,1,2-4,5+')
  assert buckets == ((0, 0), (1, 1), (2, 4), (5, None))
  rows = block_probe.accuracy_by_steps(preds, labels, steps, buckets)
  assert list(rows[0]['patches']) == ['off tubes', 'steps 0', 'steps 1',
                                      'steps 2-4', 'steps 5+']
  assert rows[0]['patches']['steps 1'] == int((steps == 1).sum())
  for bad in ('1-x', '3-1', '-2'):
    with pytest.raises(ValueError, match='--step_buckets'):
      block_probe.parse_buckets(bad)


def test_block_probe_by_steps_needs_the_paths_scenes(quickstart_run, data_dir):
  from lvtp_jax.evaluation import block_probe  # pylint: disable=g-import-not-at-top
  workdir, _ = quickstart_run
  with pytest.raises(ValueError, match='synthetic_scenes/paths'):
    block_probe.run(_config(data_dir), workdir, train_images=4,
                    eval_images=4, steps=2, by_steps=True)
