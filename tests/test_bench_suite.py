"""The accelerator suite at its --tiny size, and the speed tools under it.

The suite's full run needs an accelerator; the tiny run goes through every
code path it has (the same ones the smoke test of a full run exercises), so
the script cannot rot between the sessions that are lent a GPU.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvtp_jax import pruning
from lvtp_jax.bench import __main__ as bench_cli
from lvtp_jax.bench import profile
from lvtp_jax.bench import settings
from lvtp_jax.bench import runner
from lvtp_jax.bench import suite as suite_lib
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('suite')
  assert suite_lib.main(['--out', str(out), '--tiny']) == 0
  with open(out / 'suite.json') as f:
    result = json.load(f)
  return result, (out / 'suite.md').read_text()


def test_tiny_suite_rows(tiny_run):
  result, _ = tiny_run
  sizes = settings.TINY
  assert result['sizes'] == 'tiny' and not result['skipped']
  assert result['versions']['jax'] == jax.__version__
  rows = result['rows']
  for row in rows:
    assert row['images_per_second'] > 0
    assert len(row['round_ms']) == sizes.rounds
    assert row['ms_per_batch'] == pytest.approx(np.median(row['round_ms']))
    assert row['images_per_second'] == pytest.approx(
        row['batch'] / row['ms_per_batch'] * 1e3)
    assert row['mfu'] is None  # no datasheet peak for a CPU

  cls = [r for r in rows if r['section'] == 'classification']
  names = {(r['dtype'], r['setting']) for r in cls}
  want = {(d, s.name) for d in sizes.deit_dtypes
          for s in settings.CLASSIFICATION + settings.TORCH_ROWS}
  assert names == want
  vit = vit_lib.ViT(**dict(
      timm_convert.model_config(sizes.deit_models[0])['model'],
      img_size=sizes.deit_img, num_classes=1000))
  model_flops = 2 * flops.vit_macs(vit, (sizes.deit_img,) * 2) / 1e9
  for dtype in sizes.deit_dtypes:
    ours = next(r for r in cls if r['dtype'] == dtype
                and r['setting'] == 'unpruned')
    timm = next(r for r in cls if r['dtype'] == dtype
                and r['setting'] == 'timm eager')
    assert ours['vs_timm'] == pytest.approx(
        ours['images_per_second'] / timm['images_per_second'])
    assert ours['gflops_analytic'] == pytest.approx(model_flops)
    # XLA also counts the elementwise work (GELU's erf, softmax, norms).
    assert 1.0 <= ours['gflops_realized'] / model_flops <= 1.5
    # The same function as timm (float32: parity; bfloat16: rounding).
    limit = 1e-5 if dtype == 'float32' else 3e-2
    assert ours['rel_error_vs_timm_fp32'] <= limit
    # A policy's model FLOPs: the valid tokens of a real forward.
    for setting in settings.CLASSIFICATION[1:]:
      row = next(r for r in cls if r['dtype'] == dtype
                 and r['setting'] == setting.name)
      pruned = pruning.attach(vit, setting.pruning)
      x = jnp.zeros((1, sizes.deit_img, sizes.deit_img, 3))
      _, aux = pruned.apply(pruned.init(jax.random.PRNGKey(0), x), x,
                            return_aux=True)
      assert row['gflops_analytic'] == pytest.approx(2 * flops.vit_macs(
          vit, (sizes.deit_img,) * 2, aux['valid_tokens'],
          aux['mlp_tokens'])[0] / 1e9)

  seg = [r for r in rows if r['section'] == 'segmentation']
  assert len(seg) == (len(sizes.seg_models) * len(sizes.seg_decoders) *
                      len(sizes.seg_dtypes) * len(settings.SEGMENTATION))
  for decoder in sizes.seg_decoders:
    group = {r['setting']: r for r in seg if r['decoder'] == decoder}
    base = group['unpruned']
    for name in ('dtop', 'lvtp'):
      row = group[name]
      assert row['capacities'] == list(settings.SEG_CAPACITIES)
      assert row['realized_flop_ratio'] == pytest.approx(
          base['gflops_realized'] / row['gflops_realized'])
      assert row['realized_flop_ratio'] > 1.05   # smaller buffers
      assert row['model_flop_ratio'] == pytest.approx(
          base['gflops_analytic'] / row['gflops_analytic'])
      assert row['speedup'] == pytest.approx(
          row['images_per_second'] / base['images_per_second'])
      assert row['gflops_analytic'] < base['gflops_analytic']
      assert row['gflops_decisions'] > 0
    assert group['lvtp']['gflops_decisions'] > group['dtop'][
        'gflops_decisions']

  train = [r for r in rows if r['section'] == 'training']
  assert [r['dtype'] for r in train] == list(sizes.train_dtypes)
  for row in train:
    # Random init: the loss is about log C, finite in both dtypes.
    assert 0.5 * np.log(sizes.seg_classes) < row['first_loss'] < 3 * np.log(
        sizes.seg_classes)


def test_segmentation_model_flops_at_the_buffer_sizes(tiny_run):
  result, _ = tiny_run
  s = settings.TINY
  row = next(r for r in result['rows'] if r['setting'] == 'dtop'
             and r['decoder'] == 'linear')
  model = seg_lib.Segmenter(num_classes=s.seg_classes, patch_size=16,
                            img_size=s.seg_img, decoder='linear',
                            aux_layers=s.seg_aux_layers, **s.seg_models[0][1])
  n = (s.seg_img // 16) ** 2
  c1, c2 = (int(np.ceil(c * n)) for c in settings.SEG_CAPACITIES)
  a1, a2 = s.seg_aux_layers
  tokens = [n] * a1 + [c1] * (a2 - a1) + [c2] * (model.depth - a2)
  want = 2 * flops.segmenter_effective_macs(model, np.array(tokens)) / 1e9
  assert row['gflops_analytic'] == pytest.approx(want)
  # In-block on the Segmenter: ToMe's counts (r clipped to half the 16
  # patches: 8 merge in block 1, 4 in block 2, ...), blocks and MLPs.
  row = next(r for r in result['rows'] if r['setting'] == 'tome'
             and r.get('decoder') == 'linear')
  want = 2 * flops.segmenter_effective_macs(
      model, np.array([16, 8, 4, 2]), np.array([8, 4, 2, 1])) / 1e9
  assert row['gflops_analytic'] == pytest.approx(want)
  # Composed: ToMe in block 1 (before the first boundary, block 2), then
  # at most the capacities (12 and 8 of 16: neither shrinks the 8 left).
  row = next(r for r in result['rows'] if r['setting'] == 'lvtp+tome'
             and r['decoder'] == 'linear')
  want = 2 * flops.segmenter_effective_macs(
      model, np.array([16, 8, 8, 8]), np.array([8, 8, 8, 8]),
      dense_decoder=False) / 1e9
  assert row['gflops_analytic'] == pytest.approx(want)
  assert row['policy'] == 'lvtp+tome' and row['gflops_decisions'] > 0


def test_tiny_suite_markdown(tiny_run):
  result, md = tiny_run
  assert 'python -m lvtp_jax.bench.suite --out' in md and '--tiny' in md
  for title in ('Classification (DeiT', 'Segmentation (Segmenter',
                'Training step'):
    assert title in md
  # One table line per row, each with its img/s.
  for row in result['rows']:
    assert f'{row["images_per_second"]:,.1f}' in md


def test_every_policy_has_a_row_or_a_reason():
  benchmarked = {s.pruning.get('name', 'none')
                 for s in settings.CLASSIFICATION + settings.SEGMENTATION}
  missing = set(pruning.names()) - benchmarked - set(settings.NOT_BENCHMARKED)
  assert not missing, (
      f'policies {sorted(missing)} have no row in lvtp_jax/bench/settings.py '
      '(add one line) and no reason in NOT_BENCHMARKED')


def test_budget_skips_groups_and_says_so(tmp_path):
  assert suite_lib.main(['--out', str(tmp_path), '--tiny',
                         '--budget-s', '0']) == 0
  result = json.loads((tmp_path / 'suite.json').read_text())
  assert result['rows'] == []
  assert len(result['skipped']) == (
      len(settings.TINY.deit_models) * len(settings.TINY.deit_dtypes) +
      len(settings.TINY.seg_models) * len(settings.TINY.seg_decoders) *
      len(settings.TINY.seg_dtypes) + 1)
  assert 'Not run (time budget spent)' in (tmp_path / 'suite.md').read_text()


def test_sections_run_alone_and_bad_names_are_refused(tmp_path, monkeypatch,
                                                     capsys):
  ran = []
  for name in runner.SECTIONS:
    monkeypatch.setattr(runner.Suite, name,
                        lambda self, name=name: ran.append(name))
  assert suite_lib.main(['--out', str(tmp_path), '--no-torch',
                         '--sections', 'segmentation,training']) == 0
  # smoke then full, each in the suite's order, classification left out
  assert ran == ['training', 'segmentation'] * 2
  with pytest.raises(SystemExit):
    suite_lib.main(['--out', str(tmp_path), '--sections', 'segmentaton'])
  assert "unknown ['segmentaton']" in capsys.readouterr().err


def test_gpu_tables_warn_that_xla_counts_leave_out_library_matmuls(tiny_run):
  result, md = tiny_run
  assert 'vendor libraries' not in md   # the CPU counts everything
  gpu = dict(result, backend='gpu')
  assert 'vendor libraries (cuBLAS' in suite_lib.report.markdown(gpu)


def test_a_failing_smoke_test_stops_the_full_run(tmp_path, monkeypatch,
                                                 capsys):
  ran = []
  monkeypatch.setattr(runner.Suite, 'classification',
                      lambda self: ran.append(self.sizes))
  monkeypatch.setattr(runner.Suite, 'segmentation', lambda self: None)

  def broken(self):
    raise RuntimeError('incompatible API')

  monkeypatch.setattr(runner.Suite, 'training', broken)
  assert suite_lib.main(['--out', str(tmp_path), '--no-torch']) == 3
  assert [s.deit_batch for s in ran] == [settings.TINY.deit_batch]  # smoke
  assert not (tmp_path / 'suite.json').exists()
  assert 'SMOKE TEST FAILED' in capsys.readouterr().out


def test_the_suite_needs_no_dataset_packages():
  """The device has no tensorflow-datasets, TensorFlow or grain."""
  code = (
      'import sys\n'
      'class Block:\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      "    if name.split('.')[0] in ('tensorflow_datasets', 'tensorflow',\n"
      "                              'grain', 'array_record'):\n"
      "      raise ImportError('blocked ' + name)\n"
      'sys.meta_path.insert(0, Block())\n'
      'import lvtp_jax.bench.suite, lvtp_jax.train.step, '
      'lvtp_jax.train.optim\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_time_interleaved_alternates_the_calls():
  order = []
  calls = {name: (lambda name=name: order.append(name)) for name in 'ab'}
  times = speed.time_interleaved(calls, warmup=1, iters=2, rounds=3)
  assert order == ['a', 'b'] + ['a', 'a', 'b', 'b'] * 3
  assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}


def test_op_profile_names_the_source_operations():
  w = jnp.ones((64, 256))

  def f(x):
    return jax.nn.gelu(x @ w, approximate=False).sum()

  rows = profile.jax_op_profile(f, jnp.ones((128, 64)), calls=2)
  ops = [op for op, _, _ in rows]
  assert any(op.endswith('dot_general') for op in ops), ops
  assert all(ms >= 0 for _, ms, _ in rows)
  text = profile.format_profile('f', rows, wall_ms=10.0, top=1)
  assert text.count('\n') == 2 and 'other operations' in text


def test_bench_cli_with_profile(capsys):
  pytest.importorskip('timm')
  assert bench_cli.main(['--model', 'deit_tiny_patch16_224', '--img-size',
                         '32', '--batch', '2', '--warmup', '1', '--iters',
                         '1', '--rounds', '1', '--profile']) == 0
  out = capsys.readouterr().out
  assert 'speed ratio lvtp_jax / timm' in out
  assert 'mlp/fc1/dot_general' in out and 'aten::' in out


def test_official_benchmark_names_a_bad_checkout(tmp_path):
  from lvtp_jax.bench import official  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit, match='is not a directory'):
    official._import_from(str(tmp_path / 'missing'), 'tome')  # pylint: disable=protected-access
  with pytest.raises(SystemExit, match="cannot import 'nonexistent_pkg'"):
    official._import_from(str(tmp_path), 'nonexistent_pkg')  # pylint: disable=protected-access


def test_pruned_bench_settings_and_rows(capsys):
  from lvtp_jax.bench import pruned  # pylint: disable=g-import-not-at-top
  assert pruned.parse_setting('tome:r=13,prop_attn=False') == (
      'tome:r=13,prop_attn=False',
      dict(name='tome', mode='buffer', tome=dict(r=13, prop_attn=False)))
  with pytest.raises(ValueError, match='expected NAME:field=value'):
    pruned.parse_setting('tome:13')
  assert pruned.main(['--model', 'deit_tiny_patch16_224', '--img-size', '64',
                      '--batch', '2', '--setting', 'tome:r=4', '--setting',
                      'evit', '--warmup', '0', '--iters', '1', '--rounds',
                      '1']) == 0
  out = capsys.readouterr().out
  assert 'tome:r=4' in out and 'evit' in out and 'policy share' in out
