"""eval.py for classification, end to end, offline under tfds mock_data.

The reference for top-1 is timm itself: the same converted weights run in
timm on timm's own eval transform of the same mock images.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
import timm
import torch

import eval as eval_main
from lvtp_jax import pretrained
from lvtp_jax.convert import __main__ as convert_cli
from lvtp_jax.measure import flops
from lvtp_jax.models import vit
from tests.test_convert_timm import perturbed_timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'deit_imagenet.py')
MODEL = 'deit_tiny_patch16_224'
DATASET = 'imagenette/320px-v2'


def _load_config(arg):
  spec = importlib.util.spec_from_file_location('cfg', CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _quick_config(ckpt, num_examples, batch_size):
  """The runlocal imagenette config on `ckpt`, one timing call."""
  config = _load_config(f'model={MODEL},dataset=imagenette,runlocal')
  config.model.init_from = ckpt
  config.data.num_examples = num_examples
  config.data.batch_size = batch_size
  config.eval.progress = False
  config.eval.timing_iters = 1
  config.eval.timing_rounds = 1
  return config


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('deit')
  ref = perturbed_timm(MODEL, seed=7)
  save_file({k: v.numpy() for k, v in ref.state_dict().items()},
            str(tmp / 'w.safetensors'))
  convert_cli.main(['timm', '--model', MODEL, '--checkpoint',
                    str(tmp / 'w.safetensors'), '--out', str(tmp / 'ckpt')])
  return ref, str(tmp / 'ckpt')


def test_eval_writes_results_matching_timm(converted, tmp_path):
  ref, ckpt = converted
  # 6 images in batches of 4: the second batch is padded.
  config = _quick_config(ckpt, num_examples=6, batch_size=4)
  assert config.data.name == DATASET
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    out = eval_main.run(config, str(tmp_path))
    source = tfds.data_source(DATASET, split='validation')
    examples = [source[i] for i in range(6)]
  # timm's view of the same images and labels.
  transform = timm.data.create_transform(
      **timm.data.resolve_data_config({}, model=ref))
  batch = torch.stack([transform(Image.fromarray(np.asarray(e['image'])))
                       for e in examples])
  with torch.inference_mode():
    pred = ref(batch).argmax(-1).numpy()
  imagenette_to_1k = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
  labels = np.array([imagenette_to_1k[int(e['label'])] for e in examples])
  want_top1 = 100.0 * (pred == labels).mean()

  on_disk = json.load(open(tmp_path / 'results.json'))
  assert on_disk == json.loads(json.dumps(out))
  assert on_disk['device'].startswith('cpu')
  (row,) = on_disk['rows']
  assert row['policy'] == 'none' and row['name'] == 'none'
  assert row['params'] == {} and row['num_images'] == 6
  assert row['top1'] == pytest.approx(want_top1)
  model_gflops = 2 * flops.vit_macs(vit.create_vit('Ti/16'), (224, 224)) / 1e9
  assert row['gflops_effective'] == pytest.approx(model_gflops)
  # XLA also counts elementwise work (the erf GELU is ~5% of DeiT-Ti), see
  # tests/test_flops.py for the breakdown.
  assert 1.0 < row['gflops_realized'] / row['gflops_effective'] < 1.07
  assert row['images_per_second'] > 0
  assert row['tokens_per_stage'] == [197.0]


def test_top1_counts_only_real_examples_and_mapped_labels(converted, tmp_path):
  # A head that predicts one class everywhere: top-1 is the share of
  # examples carrying that class, padding excluded.
  _, ckpt = converted
  config = _quick_config(ckpt, num_examples=5, batch_size=4)
  _, params, meta = pretrained.load(ckpt)
  params = dict(params)
  params['head'] = dict(kernel=jnp.zeros_like(params['head']['kernel']),
                        bias=jnp.zeros(1000).at[217].set(1.0))
  forced = str(tmp_path / 'forced')
  pretrained.save(forced, params, meta)
  config.model.init_from = forced
  with tfds.testing.mock_data(num_examples=5,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    out = eval_main.run(config, str(tmp_path))
    source = tfds.data_source(DATASET, split='validation')
    labels = [int(source[i]['label']) for i in range(5)]
  want = 100.0 * np.mean([lab == 1 for lab in labels])  # 1 -> 217
  assert out['rows'][0]['top1'] == pytest.approx(want)


def test_cli_overrides_reach_the_config_and_errors_are_clear(tmp_path):
  # A real subprocess: absl flags, --config.x overrides, and the error for a
  # dataset that is not prepared.
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, os.path.join(REPO, 'eval.py'),
         f'--config={CONFIG}:model={MODEL},runlocal',
         f'--workdir={tmp_path}', '--config.eval.random_weights=True',
         f'--config.data.data_dir={tmp_path / "tfds"}']
  res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       timeout=300, check=False)
  assert res.returncode != 0
  assert 'imagenet2012' in res.stderr and 'downloads/manual' in res.stderr
  res = subprocess.run(cmd[:3] + [f'--workdir={tmp_path}'], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
  assert res.returncode != 0 and 'init_from is empty' in res.stderr


def test_eval_with_an_in_block_reduction_matches_the_reference(converted,
                                                              tmp_path):
  """A ToMe row: top-1 of the official rule (tests/torch_token_reduction.py
  on the same timm weights and transform), token counts, FLOPs, speed."""
  from tests import torch_token_reduction  # pylint: disable=g-import-not-at-top
  ref, ckpt = converted
  config = _quick_config(ckpt, num_examples=6, batch_size=6)
  config.pruning.name = 'tome'
  config.pruning.mode = 'buffer'
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    (row,) = eval_main.run(config, str(tmp_path))['rows']
    source = tfds.data_source(DATASET, split='validation')
    examples = [source[i] for i in range(6)]
  transform = timm.data.create_transform(
      **timm.data.resolve_data_config({}, model=ref))
  batch = torch.stack([transform(Image.fromarray(np.asarray(e['image'])))
                       for e in examples])
  pred = torch_token_reduction.forward(
      ref, batch, torch_token_reduction.tome([13] * 12)).argmax(-1).numpy()
  imagenette_to_1k = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
  labels = np.array([imagenette_to_1k[int(e['label'])] for e in examples])
  assert row['top1'] == pytest.approx(100.0 * (pred == labels).mean())
  assert row['policy'] == 'tome' and row['params'] == dict(
      mode='buffer', r=13, inflect=0.0, prop_attn=True)
  counts = [197 - 13 * i for i in range(13)]
  assert row['tokens_per_block'] == counts[:-1]
  assert row['mlp_tokens_per_block'] == counts[1:]
  model = vit.create_vit('Ti/16')
  assert row['gflops_effective'] == pytest.approx(
      2 * flops.vit_macs(model, (224, 224), counts[:-1], counts[1:]) / 1e9)
  assert row['realized_flop_ratio'] > 1.3   # 197 -> 41 tokens
  assert row['speedup'] > 0
