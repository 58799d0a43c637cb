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
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lvtp_jax import models
from lvtp_jax import pruning
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.data import classification as data_lib
from lvtp_jax.data import synthetic_objects
from lvtp_jax.evaluation import speedup
from lvtp_jax.evaluation import sweeps
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import checkpoint

def load_model(config: ml_collections.ConfigDict,
               workdir: Optional[str] = None) -> Tuple[Any, Any, Dict, str]:
  """(model, params, data preprocessing dict, weights) from the config.

  In order: the latest training checkpoint in `workdir` (a train.py run of
  this config), config.model.init_from (a converted directory, python -m
  lvtp_jax.convert, or a train.py workdir), or, with
  config.eval.random_weights=True (only then), random weights of the
  architecture (`timm_name`, or the test bed's width/depth/... fields).
  `weights` says which, for the results row; it is also printed. Damaged
  checkpoint steps are set aside (checkpoint.load_latest).
  """
  cfg = config.model
  found = checkpoint.load_latest(workdir, config) if workdir else None
  if found is not None:
    model, params, prep, step = found
    print(f'weights: {workdir}/checkpoints/{step}', flush=True)
    return model, params, prep, f'{workdir}/checkpoints/{step}'
  if cfg.init_from:
    print(f'weights: {cfg.init_from}', flush=True)
    return (*checkpoint.load_weights(cfg.init_from), cfg.init_from)
  if not checkpoint.random_weights_requested(config):
    raise checkpoint.nothing_to_evaluate(
        workdir, 'a converted checkpoint (python -m lvtp_jax.convert timm '
        '--model NAME --checkpoint FILE --out DIR)')
  print('weights: random_init (config.eval.random_weights)', flush=True)
  if cfg.get('timm_name'):
    arch = timm_convert.model_config(cfg.timm_name)
    model = vit_lib.ViT(num_classes=cfg.num_classes, **arch['model'])
    prep = arch['data']
  else:   # the classification test bed's own shape
    from lvtp_jax.train import classification as cls_train  # pylint: disable=g-import-not-at-top
    model, _, prep = cls_train.build(
        ml_collections.ConfigDict(dict(cfg.to_dict(), init_from='')),
        config.seed)
  size = prep['img_size']
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed),
                               jnp.zeros((1, size, size, 3)))['params']
  return models.with_dtype(model, 'float32'), params, prep, 'random_init'


def _source_and_labels(config, model):
  """(source, label_map) of config.data for the model's head."""
  dcfg = config.data
  if dcfg.name == synthetic_objects.NAME:
    difficulty = dcfg.get('difficulty')
    source = synthetic_objects.open_source(
        dcfg.split, difficulty.to_dict() if difficulty else None)
    names = source.label_names
  else:
    source = data_lib.open_source(dcfg.name, dcfg.split,
                                  dcfg.data_dir or None)
    names = data_lib.label_names(source)
  label_map = data_lib.label_map_for_head(dcfg.name, names,
                                          num_classes=model.num_classes)
  return source, label_map


def _batches(config, source, label_map, prep, num: int):
  transform_fn = functools.partial(
      data_lib.eval_transform, img_size=prep['img_size'],
      crop_pct=prep['crop_pct'], mean=prep['mean'], std=prep['std'],
      interpolation=prep.get('interpolation', 'bicubic'))
  return data_lib.eval_batches(
      source, batch_size=config.data.batch_size, transform_fn=transform_fn,
      label_map=label_map, num_examples=num,
      num_threads=config.data.get('num_threads', 0))


def quick_top1(config: ml_collections.ConfigDict, model, params,
               prep: Dict[str, Any], num_examples: int) -> Tuple[float, int]:
  """Top-1 (percent) of the unpruned model on the first num_examples images
  of config.data (0: all); training's periodic evaluation."""
  source, label_map = _source_and_labels(config, model)
  num = min(num_examples or len(source), len(source))
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x).argmax(-1))
  correct = seen = 0
  for batch in _batches(config, source, label_map, prep, num):
    pred = np.asarray(fwd(params, batch['image']))
    correct += int(((pred == batch['label']) & batch['mask']).sum())
    seen += int(batch['mask'].sum())
  return 100.0 * correct / max(seen, 1), seen


def evaluate_model(config: ml_collections.ConfigDict, model, params,
                   prep: Dict[str, Any], *, weights: str = '',
                   unpruned: Optional[speedup.Unpruned] = None,
                   maps: int = 0, per_image: bool = False
                   ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Runs config.eval on config.data with config.pruning; one results row.

  A pruned row (an in-block reduction, lvtp_jax.pruning) also records
  `speedup` (images/s over the unpruned model's, timed interleaved in the
  same process) and `realized_flop_ratio` (unpruned / pruned XLA FLOPs).

  Returns:
    (row, visual): visual holds, for the first `maps` images, the images
    and the final `src` (the slot that represents each patch; -1 dropped)
    and sizes of the slots; with per_image, visual['correct'] is the bool
    [images] of which images were classified right (paired comparisons).
  """
  model = models.with_dtype(model, config.model.get('dtype', 'float32'))
  pcfg = pruning.resolve(config.get('pruning'))
  pruned = pruning.attach(model, pcfg)
  size = prep['img_size']
  dcfg = config.data
  source, label_map = _source_and_labels(config, model)
  fwd = jax.jit(lambda p, x: pruned.apply({'params': p}, x, return_aux=True))

  num = len(source) if not dcfg.num_examples else min(dcfg.num_examples,
                                                      len(source))
  correct = 0
  seen = 0
  valid_tokens, mlp_tokens, hits = [], [], []
  last_batch = None
  visual = {}
  batches = _batches(config, source, label_map, prep, num)
  bar = tqdm.tqdm(batches, total=-(-num // dcfg.batch_size), unit='batch',
                  desc=config.eval.name or pcfg.name, file=sys.stderr,
                  disable=not config.eval.progress)
  for batch in bar:
    logits, aux = fwd(params, batch['image'])
    pred = np.asarray(jnp.argmax(logits, axis=-1))
    mask = batch['mask']
    correct += int(((pred == batch['label']) & mask).sum())
    seen += int(mask.sum())
    hits.append((pred == batch['label'])[mask])
    valid_tokens.append(np.asarray(aux['valid_tokens'])[mask])
    mlp_tokens.append(np.asarray(aux['mlp_tokens'])[mask])
    bar.set_postfix(top1=f'{100.0 * correct / max(seen, 1):.2f}')
    if maps and not visual:
      n = min(maps, int(mask.sum()))
      visual = dict(images=np.asarray(batch['image'][:n]),
                    labels=np.asarray(batch['label'][:n]),
                    pred=pred[:n], grid=model.grid)
      if 'state' in aux:
        visual.update(src=np.asarray(aux['state'].src[:n]),
                      size=np.asarray(aux['state'].size[:n]))
    last_batch = batch['image']
  if not seen:
    raise ValueError(f'no examples evaluated from {dcfg.name}:{dcfg.split}.')

  valid_tokens = np.concatenate(valid_tokens)           # [images, depth]
  mlp_tokens = np.concatenate(mlp_tokens)
  hw = (size, size)
  effective = 2 * flops.vit_macs(model, hw, valid_tokens,
                                 mlp_tokens).mean() / 1e9
  if pcfg.name == 'none':
    unpruned = None                       # nothing to compare with
  else:
    unpruned = unpruned or speedup.Unpruned(model)
  apply = jax.jit(lambda p, x: pruned.apply({'params': p}, x))
  measured = speedup.measure(config.eval, apply, apply, params,
                             jnp.asarray(last_batch), unpruned)
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
      gflops_realized=measured['gflops_realized'],
      gflops_effective=float(effective),
      images_per_second=measured['images_per_second'],
      batch_size=dcfg.batch_size,
      dtype=jnp.dtype(model.dtype).name,
      device=speed.device_name(),
      stage_starts=starts,
      tokens_per_stage=[float(mean_tokens[s]) for s in starts],
      tokens_per_block=[float(t) for t in mean_tokens],
      mlp_tokens_per_block=[float(t) for t in mlp_tokens.mean(axis=0)],
  )
  if weights:
    row['weights'] = weights
  if not config.eval.get('in_plots', True):
    row['in_plots'] = False    # a diagnostic row (sweeps.depth_probe)
  if config.eval.get('family'):
    row['family'] = config.eval.family   # e.g. 'gtp (README)', '... (fine-tuned)'
  if pcfg.name != 'none':
    row.update(speedup=measured['speedup'],
               realized_flop_ratio=measured['realized_ratio'])
  if visual:
    visual['name'] = row['name']
  if per_image:
    visual['correct'] = np.concatenate(hits)
  return row, visual


def evaluate_sweep(config: ml_collections.ConfigDict, model, params,
                   prep: Dict[str, Any], weights: str = '',
                   per_image: bool = False
                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """`evaluate_model` for each setting of config.sweep (one model).

  Returns:
    (rows, visuals): visuals['maps'] holds the first config.eval.token_maps
    images' token maps of every setting (lvtp_jax.evaluation.plots);
    with per_image, visuals['correct'][row name] the per-image hits.
  """
  rows, maps, correct = [], [], {}
  unpruned = speedup.Unpruned(models.with_dtype(
      model, config.model.get('dtype', 'float32')))
  for setting in sweeps.settings(config):
    row, visual = evaluate_model(
        setting, model, params, prep, weights=weights, unpruned=unpruned,
        maps=setting.eval.get('token_maps', 0), per_image=per_image)
    rows.append(row)
    correct[row['name']] = visual.pop('correct', None)
    if visual:
      maps.append(visual)
  return rows, dict(token_maps=maps, prep=prep, correct=correct)


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str] = None
             ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Every setting of config.sweep on the model `load_model` finds."""
  model, params, prep, weights = load_model(config, workdir)
  return evaluate_sweep(config, model, params, prep, weights=weights)
