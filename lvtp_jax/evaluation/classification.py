"""Top-1 evaluation of a classifier, with FLOPs and throughput (one results row).

The row layout is DESIGN §3: name, policy, params, top1 (percent),
gflops_realized (XLA, per image), gflops_effective (analytic, from the valid
tokens per block, averaged over the evaluated images), images_per_second
(after warm-up, on the device the run used), tokens_per_stage.
"""

import functools
import sys
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lvtp_jax import models
from lvtp_jax import pretrained
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.data import classification as data_lib
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import vit as vit_lib

# Policies that classification evaluation can run today. The pruning
# registry (issue: policies over the token buffer) will replace this.
POLICIES = ('none',)


def load_model(cfg: ml_collections.ConfigDict,
               seed: int = 0) -> Tuple[Any, Any, Dict]:
  """(model, params, data preprocessing dict) from config.model.

  `init_from` names a converted directory (python -m lvtp_jax.convert). With
  `random_init=True` and no `init_from`, the architecture of `timm_name` is
  built with random weights (smoke tests, speed runs).
  """
  if cfg.init_from:
    model, params, meta = pretrained.load(cfg.init_from)
    return model, params, meta['data']
  if not cfg.random_init:
    raise ValueError(
        'config.model.init_from is empty: point it at a converted checkpoint '
        '(python -m lvtp_jax.convert timm --model NAME --checkpoint FILE '
        '--out DIR, then --config.model.init_from=DIR), or set '
        '--config.model.random_init=True for random weights.')
  arch = timm_convert.model_config(cfg.timm_name)
  model = vit_lib.ViT(num_classes=cfg.num_classes, **arch['model'])
  size = arch['data']['img_size']
  params = jax.jit(model.init)(jax.random.PRNGKey(seed),
                               jnp.zeros((1, size, size, 3)))['params']
  return model, params, arch['data']


def evaluate(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Runs config.eval on config.data; returns one results row."""
  if config.pruning.name not in POLICIES:
    raise ValueError(f'config.pruning.name={config.pruning.name!r} is not '
                     f'available for classification; known: {POLICIES}.')
  model, params, prep = load_model(config.model, config.seed)
  model = models.with_dtype(model, config.model.get('dtype', 'float32'))
  size = prep['img_size']
  transform_fn = functools.partial(
      data_lib.eval_transform, img_size=size, crop_pct=prep['crop_pct'],
      mean=prep['mean'], std=prep['std'],
      interpolation=prep.get('interpolation', 'bicubic'))
  dcfg = config.data
  source = data_lib.open_source(dcfg.name, dcfg.split, dcfg.data_dir or None)
  label_map = data_lib.label_map_for_head(
      dcfg.name, data_lib.label_names(source), num_classes=model.num_classes)
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, return_aux=True))

  num = len(source) if not dcfg.num_examples else min(dcfg.num_examples,
                                                      len(source))
  correct = 0
  seen = 0
  valid_tokens = []
  last_batch = None
  batches = data_lib.eval_batches(
      source, batch_size=dcfg.batch_size, transform_fn=transform_fn,
      label_map=label_map, num_examples=num,
      num_threads=dcfg.get('num_threads', 0))
  bar = tqdm.tqdm(batches, total=-(-num // dcfg.batch_size), unit='batch',
                  desc='eval', file=sys.stderr, disable=not config.eval.progress)
  for batch in bar:
    logits, aux = fwd(params, batch['image'])
    pred = np.asarray(jnp.argmax(logits, axis=-1))
    mask = batch['mask']
    correct += int(((pred == batch['label']) & mask).sum())
    seen += int(mask.sum())
    valid_tokens.append(np.asarray(aux['valid_tokens'])[mask])
    bar.set_postfix(top1=f'{100.0 * correct / max(seen, 1):.2f}')
    last_batch = batch['image']
  if not seen:
    raise ValueError(f'no examples evaluated from {dcfg.name}:{dcfg.split}.')

  valid_tokens = np.concatenate(valid_tokens)           # [images, depth]
  hw = (size, size)
  effective = 2 * flops.vit_macs(model, hw, valid_tokens).mean() / 1e9
  images = jnp.asarray(last_batch)
  apply = lambda p, x: model.apply({'params': p}, x)
  realized = flops.realized_gflops(apply, params, images,
                                   batch_size=dcfg.batch_size)
  ips = speed.images_per_second(
      jax.jit(apply), params, images, batch_size=dcfg.batch_size,
      warmup=config.eval.warmup, iters=config.eval.timing_iters,
      rounds=config.eval.timing_rounds)
  return dict(
      name=config.eval.name or config.pruning.name,
      policy=config.pruning.name,
      params={},
      dataset=f'{dcfg.name}:{dcfg.split}',
      num_images=seen,
      top1=100.0 * correct / seen,
      gflops_realized=realized,
      gflops_effective=float(effective),
      images_per_second=ips,
      batch_size=dcfg.batch_size,
      dtype=jnp.dtype(model.dtype).name,
      stage_starts=[0],
      tokens_per_stage=[float(valid_tokens[:, 0].mean())],
  )
