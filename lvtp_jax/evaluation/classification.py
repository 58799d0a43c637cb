"""Top-1 evaluation of a classifier, with FLOPs and throughput (one results row).

The row layout is DESIGN §3: name, policy, params, top1 (percent),
gflops_realized (XLA, per image), gflops_effective (analytic, from the valid
tokens entering each block and its MLP, averaged over the evaluated images),
images_per_second (after warm-up, on the device the run used),
tokens_per_stage, tokens_per_block and mlp_tokens_per_block. config.pruning
may name an in-block reduction (EViT, ToMe; lvtp_jax.pruning).
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
from lvtp_jax import pruning
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.data import classification as data_lib
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import vit as vit_lib

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
  """Runs config.eval on config.data with config.pruning; one results row.

  A pruned row (an in-block reduction, lvtp_jax.pruning) also records
  `speedup` (images/s over the unpruned model's, timed interleaved in the
  same process) and `realized_flop_ratio` (unpruned / pruned XLA FLOPs).
  """
  model, params, prep = load_model(config.model, config.seed)
  model = models.with_dtype(model, config.model.get('dtype', 'float32'))
  pcfg = pruning.resolve(config.get('pruning'))
  pruned = pruning.attach(model, pcfg)
  size = prep['img_size']
  transform_fn = functools.partial(
      data_lib.eval_transform, img_size=size, crop_pct=prep['crop_pct'],
      mean=prep['mean'], std=prep['std'],
      interpolation=prep.get('interpolation', 'bicubic'))
  dcfg = config.data
  source = data_lib.open_source(dcfg.name, dcfg.split, dcfg.data_dir or None)
  label_map = data_lib.label_map_for_head(
      dcfg.name, data_lib.label_names(source), num_classes=model.num_classes)
  fwd = jax.jit(lambda p, x: pruned.apply({'params': p}, x, return_aux=True))

  num = len(source) if not dcfg.num_examples else min(dcfg.num_examples,
                                                      len(source))
  correct = 0
  seen = 0
  valid_tokens, mlp_tokens = [], []
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
    mlp_tokens.append(np.asarray(aux['mlp_tokens'])[mask])
    bar.set_postfix(top1=f'{100.0 * correct / max(seen, 1):.2f}')
    last_batch = batch['image']
  if not seen:
    raise ValueError(f'no examples evaluated from {dcfg.name}:{dcfg.split}.')

  valid_tokens = np.concatenate(valid_tokens)           # [images, depth]
  mlp_tokens = np.concatenate(mlp_tokens)
  hw = (size, size)
  effective = 2 * flops.vit_macs(model, hw, valid_tokens,
                                 mlp_tokens).mean() / 1e9
  images = jnp.asarray(last_batch)
  applies = dict(model=jax.jit(lambda p, x: pruned.apply({'params': p}, x)))
  if pcfg.name != 'none':
    applies['unpruned'] = jax.jit(lambda p, x: model.apply({'params': p}, x))
  realized = {k: flops.realized_gflops(f, params, images,
                                       batch_size=dcfg.batch_size)
              for k, f in applies.items()}
  ips = speed.compare_images_per_second(
      applies, params, images, batch_size=dcfg.batch_size,
      warmup=config.eval.warmup, iters=config.eval.timing_iters,
      rounds=config.eval.timing_rounds)
  mean_tokens = valid_tokens.mean(axis=0)
  starts = [0] + [i for i in range(1, model.depth)
                  if mean_tokens[i] != mean_tokens[i - 1]]
  row = dict(
      name=config.eval.name or pcfg.name,
      policy=pcfg.name,
      params=pruning.summary(pcfg),
      dataset=f'{dcfg.name}:{dcfg.split}',
      num_images=seen,
      top1=100.0 * correct / seen,
      gflops_realized=realized['model'],
      gflops_effective=float(effective),
      images_per_second=ips['model'],
      batch_size=dcfg.batch_size,
      dtype=jnp.dtype(model.dtype).name,
      device=speed.device_name(),
      stage_starts=starts,
      tokens_per_stage=[float(mean_tokens[s]) for s in starts],
      tokens_per_block=[float(t) for t in mean_tokens],
      mlp_tokens_per_block=[float(t) for t in mlp_tokens.mean(axis=0)],
  )
  if pcfg.name != 'none':
    row.update(speedup=ips['model'] / ips['unpruned'],
               realized_flop_ratio=realized['unpruned'] / realized['model'])
  return row
