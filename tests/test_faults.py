"""Fault injection (issue 22): damaged checkpoints, preemption, duplicated
metrics, unreadable weight files, evaluation without weights, a package
that imports outside the repository.

Every fault is made for real: files truncated, emptied or deleted on disk,
signals sent to a real training process, broken files handed to the real
command lines.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import eval as eval_main
from lvtp_jax.bench import __main__ as bench_cli
from lvtp_jax.convert import __main__ as convert_cli
from lvtp_jax.convert import readers
from lvtp_jax.train import checkpoint
from lvtp_jax.train import classification as cls_train
from lvtp_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'quickstart_cls.py')


def _config(**train):
  spec = importlib.util.spec_from_file_location('qcls_faults', CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config('runlocal')
  config.train.update(dict(progress=False, eval_every=0, num_steps=4,
                           checkpoint_every=2, max_to_keep=2), **train)
  config.eval.progress = False
  config.model.depth = 2     # faults do not need the test bed's 12 blocks
  config.sweep = ()
  return config


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A finished :runlocal classification run with steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'run')
  cls_train.train(_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return workdir


def _copy(run_dir, tmp_path):
  out = str(tmp_path / 'run')
  shutil.copytree(run_dir, out)
  return out


def _empty_meta(step_dir):
  open(os.path.join(step_dir, 'meta', 'metadata'), 'w').close()


def _truncated_data(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                    recursive=True)
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _deleted_manifests(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'manifest.ocdbt'),
                    recursive=True)
  assert files
  for path in files:
    os.remove(path)


def _deleted_meta(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'meta'))


DAMAGE = {'empty_meta': _empty_meta, 'truncated_data': _truncated_data,
          'deleted_manifests': _deleted_manifests,
          'deleted_meta': _deleted_meta}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_eval_sets_a_damaged_newest_step_aside(run_dir, tmp_path, damage,
                                               capsys):
  workdir = _copy(run_dir, tmp_path)
  DAMAGE[damage](os.path.join(workdir, 'checkpoints', '4'))
  model, params, _, step = checkpoint.load_latest(workdir, _config())
  assert step == 2 and model.depth == 2 and params
  err = capsys.readouterr().err
  assert re.search(r'checkpoint step 4 of \S+ is unreadable \(\w+', err), err
  aside = os.path.join(workdir, 'checkpoints_damaged', '4')
  assert os.path.isdir(aside), 'moved aside, never deleted'
  assert open(os.path.join(aside, 'DAMAGED.txt')).read().strip()
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert len(err.splitlines()) < 5, 'no library noise: ' + err[:2000]


def test_resume_and_eval_py_use_the_newest_intact_step(run_dir, tmp_path,
                                                      capfd):
  workdir = _copy(run_dir, tmp_path)
  _truncated_data(os.path.join(workdir, 'checkpoints', '4'))
  # Resume: one line names the damaged step, one the step resumed from, and
  # the replayed steps 3-4 are not written to metrics.jsonl twice.
  cls_train.train(_config(num_steps=5), workdir)
  out, err = capfd.readouterr()
  assert f'resuming {workdir} from step 2' in out
  assert 'checkpoint step 4' in err and 'Exception ignored' not in err
  assert len(err) < 3000, err[:3000]
  steps = [json.loads(line)['step'] for line in open(
      os.path.join(workdir, 'metrics.jsonl'))]
  assert sorted(steps) == steps == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '5']
  # eval.py prints which weights it scored.
  row = eval_main.run(_config(), workdir)['rows'][-1]
  assert row['weights'] == f'{workdir}/checkpoints/5'
  assert f'weights: {workdir}/checkpoints/5' in capfd.readouterr().out


def test_no_intact_step_is_one_error_with_the_choices(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  _empty_meta(os.path.join(workdir, 'checkpoints', '4'))
  _deleted_manifests(os.path.join(workdir, 'checkpoints', '2'))
  with pytest.raises(checkpoint.CheckpointError) as e:
    eval_main.run(_config(), workdir)
  message = str(e.value)
  assert f'no intact checkpoint in {workdir}' in message
  assert 'step 4: JSONDecodeError' in message and 'step 2: ' in message
  assert 'Choices:' in message
  # Training refuses too, rather than silently starting over.
  workdir = _copy(run_dir, tmp_path / 'again')
  for step in ('2', '4'):
    _empty_meta(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(checkpoint.CheckpointError, match='--restart'):
    cls_train.train(_config(num_steps=5), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_damaged'))) == [
      '2', '4']


def test_a_state_of_other_shapes_is_named():
  have = {'w': np.zeros((2, 3), np.float32)}
  want = {'w': np.zeros((2, 4), np.float32)}
  with pytest.raises(ValueError, match=r"\['w'\] is float32\[2, 3\], the "
                     r'state needs float32\[2, 4\]'):
    checkpoint._check_like(have, want)  # pylint: disable=protected-access


def test_eval_refuses_to_score_weights_nobody_trained(tmp_path, capsys):
  config = _config()
  assert config.model.random_init    # the training config asks for it
  with pytest.raises(ValueError, match=r'nothing to evaluate: --workdir '
                     r'\S*missing does not exist'):
    eval_main.run(config, str(tmp_path / 'missing'))
  assert not (tmp_path / 'missing').exists()
  config.eval.random_weights = True  # the one explicit way
  row = eval_main.run(config, str(tmp_path / 'smoke'))['rows'][0]
  assert row['weights'] == 'random_init'
  assert 'weights: random_init' in capsys.readouterr().out


def test_init_from_a_workdir_without_checkpoints_is_refused(tmp_path):
  config = _config()
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  config.model.init_from = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='without a checkpoint'):
    cls_train.train(config, str(tmp_path / 'run'))


def test_metrics_of_one_run(tmp_path, capsys):
  path = str(tmp_path / 'metrics.jsonl')
  rows = [{'step': 1}, {'step': 2}, {'step': 2, 'eval_top1': 5.0},
          {'step': 3}]
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write('{"step": 4, "lo')            # torn by a kill mid-write
  loop.start_metrics(path, start=2, restart=False)
  assert [json.loads(x) for x in open(path)] == rows[:3]
  loop.start_metrics(path, start=0, restart=True)
  assert not os.path.exists(path)
  (kept,) = glob.glob(str(tmp_path / 'metrics.*.jsonl'))
  assert [json.loads(x) for x in open(kept)] == rows[:3]
  assert kept in capsys.readouterr().out


def _wait_for_rows(path, n, proc, limit=240):
  t0 = time.time()
  while time.time() - t0 < limit:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path) and len(open(path).readlines()) >= n:
      return
    time.sleep(0.2)
  raise AssertionError(f'{path}: fewer than {n} rows after {limit} s')


def test_sigterm_and_sigint_save_and_say_how_to_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  cmd = [sys.executable, os.path.join(REPO, 'train.py'),
         f'--config={CONFIG}:runlocal', f'--workdir={workdir}',
         '--config.train.num_steps=100000', '--config.train.eval_every=0',
         '--config.train.checkpoint_every=100000',
         '--config.train.progress=False', '--config.model.depth=2']
  env = dict(os.environ, PYTHONPATH=REPO)

  def interrupt(sig, rows):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
      _wait_for_rows(metrics, rows, proc)
      proc.send_signal(sig)
      out, err = proc.communicate(timeout=120)
    finally:
      proc.kill()
    return proc.returncode, out, err

  # A scheduler's preemption: the step in progress is saved.
  code, _, err = interrupt(signal.SIGTERM, 3)
  assert code == 128 + signal.SIGTERM, err[-2000:]
  saved = re.search(r'SIGTERM: saved step (\d+) in ', err)
  assert saved, err[-2000:]
  step = int(saved.group(1))
  assert 'To resume, run the same command again' in err
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert 'Traceback' not in err, err[-3000:]
  # Ctrl-C in the resumed run: resumes where the first stopped, saves again.
  code, out, err = interrupt(signal.SIGINT, step + 3)
  assert code == 128 + signal.SIGINT, err[-2000:]
  assert f'resuming {workdir} from step {step}' in out
  later = int(re.search(r'SIGINT: saved step (\d+) in ', err).group(1))
  assert later > step and 'Traceback' not in err, err[-3000:]
  steps = [json.loads(line)['step'] for line in open(metrics)]
  assert steps == list(range(1, later + 1))


def test_nan_advice_is_a_command_that_runs(tmp_path, monkeypatch):
  real = cls_train.synthetic_objects.train_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 2:
        batch['image'][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(cls_train.synthetic_objects, 'train_batches', poisoned)
  old = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError) as e:
    cls_train.train(_config(), old)
  message = str(e.value)
  assert 'at step 3; last good checkpoint: step 2' in message
  assert '--restart' in message
  hint = re.search(r'--config\.model\.init_from=(\S+) '
                   r'--config\.train\.lr=<lower>', message)
  assert hint and hint.group(1) == old
  monkeypatch.undo()
  # The advice as given: a new workdir from the last good weights, lower lr.
  config = _config()
  config.model.init_from = hint.group(1)
  config.train.lr = 1e-4
  cls_train.train(config, str(tmp_path / 'new'))


# ----------------------------------------------------------------------------
# Weight files and command lines.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def weight_files(tmp_path_factory):
  torch = pytest.importorskip('torch')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('weights')
  sd = {'a.weight': np.ones((4, 4), np.float32), 'b': np.zeros(3, np.float32)}
  save_file(sd, str(d / 'good.safetensors'))
  data = (d / 'good.safetensors').read_bytes()
  (d / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
  (d / 'empty.safetensors').write_bytes(b'')
  (d / 'random.safetensors').write_bytes(
      np.random.default_rng(0).bytes(1000))
  (d / 'header.safetensors').write_bytes(data[:8] + b'{junk' + data[13:])
  torch.save(torch.nn.Linear(2, 2), str(d / 'module.pth'))
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()},
             str(d / 'sd.pth'))
  (d / 'truncated.pth').write_bytes((d / 'sd.pth').read_bytes()[:300])
  return d


@pytest.mark.parametrize('name, match', [
    ('truncated.safetensors', 'not a readable .safetensors file'),
    ('empty.safetensors', r'is empty \(0 bytes\)'),
    ('random.safetensors', 'not a readable .safetensors file'),
    ('header.safetensors', 'not a readable .safetensors file'),
    ('module.pth', r'not a state dict.*model.state_dict\(\)'),
    ('truncated.pth', 'not a readable torch checkpoint'),
])
def test_unreadable_weight_files_are_named(weight_files, name, match):
  path = str(weight_files / name)
  with pytest.raises(ValueError, match=match) as e:
    readers.read_checkpoint(path)
  assert path in str(e.value)
  assert readers.read_checkpoint(str(weight_files / 'good.safetensors'))


def test_command_line_values_are_checked(weight_files, capsys):
  for argv in (['timm', '--model', 'deit_tiny_patch16_224', '--checkpoint',
                str(weight_files / 'good.safetensors'), '--out', 'x',
                '--img-size', '-16'],):
    with pytest.raises(SystemExit):
      convert_cli.main(argv)
    assert '--img-size -16: give a positive' in capsys.readouterr().err
  for argv, match in ((['--img-size', '-16'], '--img-size -16 must be > 0'),
                      (['--model', 'resnet50'], 'the ResNet architecture'),
                      (['--img-size', '100'], 'not a multiple of the patch')):
    with pytest.raises(SystemExit):
      bench_cli.main(argv)
    assert match in capsys.readouterr().err


def test_a_classifier_is_not_a_segmenter_checkpoint(weight_files, tmp_path):
  timm = pytest.importorskip('timm')
  net = timm.create_model('vit_tiny_patch16_224', pretrained=False)
  variant = tmp_path / 'variant.yml'
  variant.write_text(
      'net_kwargs: {image_size: [512, 512], patch_size: 16, d_model: 192, '
      'n_heads: 3, n_layers: 12, n_cls: 150, distilled: false,\n'
      '  decoder: {name: mask_transformer, n_layers: 2}}\n')
  from lvtp_jax.convert import segmenter as seg_convert  # pylint: disable=g-import-not-at-top
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  with pytest.raises(ValueError, match='a timm ViT / DeiT classifier'):
    seg_convert.from_segmenter(sd, variant=seg_convert.read_variant(
        str(variant)))
  (tmp_path / 'empty.yml').write_text('')
  with pytest.raises(ValueError, match='not a Segmenter variant.yml'):
    seg_convert.read_variant(str(tmp_path / 'empty.yml'))


def test_readme_snippet_runs_outside_the_repository(tmp_path):
  """The documented set-up installs the package (pip install -e .)."""
  readme = open(os.path.join(REPO, 'README.md')).read()
  assert 'pip install -r requirements.txt -r requirements-parity.txt -e .' in (
      readme)
  snippet = re.search(r'```python\n(from lvtp_jax import pruning\nfrom '
                      r'lvtp_jax.convert import from_timm.*?)```', readme,
                      re.S).group(1)
  timm = pytest.importorskip('timm')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  net = timm.create_model('deit_small_patch16_224', pretrained=False)
  save_file(net.state_dict(), str(tmp_path / 'model.safetensors'))
  # Up to the forward (compiling DeiT-S costs a minute here; the forward
  # itself is tested in test_inblock.py): the point is the imports.
  body = ''.join(line + '\n' for line in snippet.splitlines()
                 if '.apply(' not in line)
  script = body + 'assert tome.pruning is not None\n'
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  res = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert res.returncode == 0, (
      'the README snippet fails outside the repository root; is the package '
      'installed (pip install -e .)?\n' + res.stderr[-2000:])
