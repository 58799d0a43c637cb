"""mIoU / boundary mIoU of a Segmenter on a dataset, with FLOPs and throughput.

Two inference modes (config.eval.mode):
  whole  fixed-shape batches: every image (optionally resized, see
         config.eval.short_size) is padded to config.eval.size and the model
         runs once per batch; metrics at that resolution. For datasets of
         small fixed-size images (synthetic_scenes).
  slide  the official Segmenter protocol, one image at a time: resize the
         short side to config.eval.short_size (long side <= long_max),
         sliding windows (config.eval.window / stride), bilinear resize back,
         metrics at the original resolution (ADE20K, Cityscapes, PC).

FLOPs and throughput are per image. In 'whole' mode an image is one forward
at size x size; in 'slide' mode it is the average number of windows per image
times one window forward. images_per_second is measured on a batch of
forwards at that shape (size, or window) and divided by the windows per image.
"""

import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lvtp_jax.data import seg_transforms
from lvtp_jax.data import segmentation as seg_data
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import inference
from lvtp_jax.evaluation import segmentation_metrics
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.train import checkpoint
from lvtp_jax.train import model_init

POLICIES = ('none',)

# The official single-scale evaluation protocol per dataset: dataset ->
# (split, config.eval overrides). segm/eval/miou.py defaults: short side
# resized to the dataset's test scale, windows of the training crop with
# stride crop - 32 (../shared/specs/weights_and_data.md §2.6).
PROTOCOLS = {
    'ade20k': ('validation', dict(mode='slide', short_size=512, long_max=2048,
                                  window=512, stride=480)),
    'cityscapes': ('validation', dict(mode='slide', short_size=1024,
                                      long_max=2048, window=768, stride=736)),
    'pascal_context': ('validation', dict(mode='slide', short_size=520,
                                          long_max=4160, window=480,
                                          stride=448)),
    'synthetic_scenes': ('validation', dict(mode='whole', size=128,
                                            short_size=0, long_max=0)),
}


def protocol(dataset: str, crop: Optional[int] = None
             ) -> Tuple[str, Dict[str, Any]]:
  """(split, config.eval overrides) of PROTOCOLS[dataset].

  Args:
    dataset: a key of PROTOCOLS.
    crop: a training crop other than the dataset's default (Seg-L trains at
      640 on ADE20K): the window becomes crop, the stride crop - 32, and
      the short side at least crop.
  """
  if dataset not in PROTOCOLS:
    raise ValueError(f'dataset={dataset!r}; known: {sorted(PROTOCOLS)}.')
  split, overrides = PROTOCOLS[dataset]
  overrides = dict(overrides)
  if crop and overrides['mode'] == 'slide' and crop != overrides['window']:
    overrides.update(window=crop, stride=crop - 32,
                     short_size=max(crop, overrides['short_size']))
  return split, overrides


def build_model(config: ml_collections.ConfigDict, workdir: Optional[str] = None
                ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any], str]:
  """The model to evaluate and where its weights come from.

  In order of precedence:
    1. the latest training checkpoint in WORKDIR/checkpoints (a run of
       train.py with this config: eval.py evaluates what training produced);
    2. config.model.init_from, a converted Segmenter (python -m
       lvtp_jax.convert segmenter ...) or a training workdir;
    3. random weights, when config.model.random_init is set (smoke tests,
       speed); otherwise a ValueError says what to provide.

  Returns:
    (model, params, prep, source): prep holds mean/std in 0..1 units the
    images are normalised with; source names the weights for results.json.
  """
  cfg = config.model
  step = checkpoint.latest_step(workdir) if workdir else None
  if step is not None:
    model, params, prep = checkpoint.load_for_eval(workdir, config, step)
    return model, params, prep, f'{workdir}/checkpoints/{step}'
  if not cfg.init_from and not cfg.random_init:
    raise ValueError(
        f'nothing to evaluate: {workdir or "the workdir"} holds no training '
        'checkpoint and config.model.init_from is empty. Train first (python '
        'train.py with the same --config and --workdir), point '
        '--config.model.init_from at a converted Segmenter (python -m '
        'lvtp_jax.convert segmenter --checkpoint checkpoint.pth --variant '
        'variant.yml --out DIR), or set --config.model.random_init=True.')
  model, params, prep, initialised = model_init.build(cfg, config.seed)
  if initialised:
    raise ValueError(
        f'{cfg.init_from} lacks parameters the configured model needs: '
        f'{initialised[:4]}{"..." if len(initialised) > 4 else ""}. '
        'Evaluating untrained heads is meaningless: train them first, or set '
        'config.model.aux_layers=() for the converted model as it is.')
  return model, params, prep, cfg.init_from or 'random_init'


def sweep_settings(config: ml_collections.ConfigDict
                   ) -> List[ml_collections.ConfigDict]:
  """One config per evaluation setting of config.sweep.

  config.sweep is a sequence of override dicts with dotted keys, e.g.
  ({'eval.name': 'dense'}, {'pruning.name': 'dtop',
  'pruning.dtop.threshold': 0.9}); each gives one results row. An empty
  sweep means one setting: the config as it is.
  """
  overrides = list(config.get('sweep', ()) or ()) or [{}]
  settings = []
  for i, override in enumerate(overrides):
    setting = ml_collections.ConfigDict(config.to_dict())
    for key, value in dict(override).items():
      *parents, leaf = key.split('.')
      node = setting
      for name in parents:
        node = node.get(name) if isinstance(node, ml_collections.ConfigDict) \
            else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f'config.sweep[{i}] sets {key!r}, which is not a '
                         'config field; check the spelling against the '
                         'config.')
      node[leaf] = value
    settings.append(setting)
  return settings


def evaluate(config: ml_collections.ConfigDict,
             workdir: Optional[str] = None) -> List[Dict[str, Any]]:
  """Evaluates every setting of config's sweep; one results row each."""
  model, params, prep, source = build_model(config, workdir)
  return evaluate_sweep(config, model, params, prep, weights=source)


def evaluate_sweep(config: ml_collections.ConfigDict, model, params,
                   prep: Dict[str, Any], weights: str = ''
                   ) -> List[Dict[str, Any]]:
  """`evaluate_model` for each setting of config.sweep (one model)."""
  rows = []
  for setting in sweep_settings(config):
    row = evaluate_model(setting, model, params, prep)
    if weights:
      row['weights'] = weights
    rows.append(row)
  return rows


def _whole(model, params, source, cfg, mean, std, metrics, num):
  """Batched whole-image inference; returns (last batch images, windows/img)."""
  ecfg = cfg.eval
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x))
  batches = seg_data.eval_batches(
      source, batch_size=cfg.data.batch_size, size=ecfg.size,
      num_examples=num, mean=mean, std=std,
      short_size=ecfg.short_size or None, long_max=ecfg.long_max or None)
  images = None
  for batch in _progress(batches, -(-num // cfg.data.batch_size), cfg):
    pred = np.asarray(jnp.argmax(fwd(params, batch['image']), axis=-1))
    pixel_mask = batch['pixel_mask'] & batch['mask'][:, None, None]
    metrics.update(pred, batch['segmentation'], mask=pixel_mask)
    images = batch['image']
  return jnp.asarray(images), 1.0


def _slide(model, params, source, cfg, mean, std, metrics, num):
  """Official sliding-window inference, one image at a time."""
  ecfg = cfg.eval
  predict = inference.predict_fn_for(model, params)
  windows = []
  for i in _progress(range(num), num, cfg):
    ex = seg_transforms.eval_transform(
        source[i], short_size=ecfg.short_size, long_max=ecfg.long_max,
        mean=mean, std=std)
    image = inference.upsample_to_window(jnp.asarray(ex['image']), ecfg.window)
    probs = inference.segment(
        predict, image, out_size=ex['segmentation'].shape, mode='slide',
        window=ecfg.window, stride=ecfg.stride, batch_size=cfg.data.batch_size)
    metrics.update(np.asarray(jnp.argmax(probs, -1)), ex['segmentation'])
    h, w = image.shape[:2]
    windows.append(len(inference.window_anchors(h, ecfg.window, ecfg.stride)) *
                   len(inference.window_anchors(w, ecfg.window, ecfg.stride)))
  crops = jnp.zeros((cfg.data.batch_size, ecfg.window, ecfg.window, 3))
  return crops, float(np.mean(windows))


def _progress(it, total, cfg):
  return tqdm.tqdm(it, total=total, unit='it', desc='eval', file=sys.stderr,
                   disable=not cfg.eval.progress)


def evaluate_quality(config: ml_collections.ConfigDict,
                     model: seg_lib.Segmenter, params: Any,
                     prep: Dict[str, Any], num_examples: int = 0
                     ) -> Tuple[Dict[str, Any], jax.Array, float, int]:
  """Segmentation metrics of (model, params) on config.data's split.

  Args:
    config: reads config.data, config.eval (config.model is not read).
    model: the Segmenter.
    params: its parameters.
    prep: dict with 'mean' and 'std' in 0..1 units, as the images the model
      was trained on were normalised.
    num_examples: evaluate the first this many images (0:
      config.data.num_examples, where 0 means the whole split).

  Returns:
    (metrics, forward_batch, windows_per_image, num_images): the metric dict
    of SegmentationMetrics.result(), one batch of forward inputs (for FLOPs
    and timing) and the average forwards per image.
  """
  if config.eval.mode not in inference.MODES:
    raise ValueError(f'config.eval.mode={config.eval.mode!r}; expected one of '
                     f'{inference.MODES}.')
  dataset = segmentation_datasets.get_dataset(config.data.name)
  if dataset.num_classes != model.num_classes:
    raise ValueError(
        f'{config.data.name} has {dataset.num_classes} classes but the model '
        f'predicts {model.num_classes}; use a model trained for this dataset.')
  source = segmentation_datasets.open_segmentation_source(
      config.data.name, config.data.split, config.data.data_dir or None)
  limit = num_examples or config.data.num_examples
  num = min(limit, len(source)) if limit else len(source)
  # Converted checkpoints store mean/std in 0..1; the segmentation transforms
  # normalise uint8 images in 0..255 units.
  mean = tuple(255.0 * m for m in prep['mean'])
  std = tuple(255.0 * s for s in prep['std'])
  metrics = segmentation_metrics.SegmentationMetrics(
      model.num_classes, ignore_index=dataset.ignore_index,
      boundary_width=config.eval.boundary_width or None)
  run = _whole if config.eval.mode == 'whole' else _slide
  images, windows_per_image = run(model, params, source, config, mean, std,
                                  metrics, num)
  return metrics.result(), images, windows_per_image, num


def evaluate_model(config: ml_collections.ConfigDict,
                   model: seg_lib.Segmenter, params: Any,
                   prep: Dict[str, Any]) -> Dict[str, Any]:
  """One results row: quality, FLOPs and throughput of one setting.

  Args:
    config: the setting (config.pruning, config.data, config.eval).
    model: the Segmenter.
    params: its parameters.
    prep: dict with 'mean' and 'std' in 0..1 units (see evaluate_quality).

  Returns:
    The row (DESIGN §3): name, policy, params, miou, boundary_miou,
    pixel_accuracy, gflops_realized, gflops_effective, images_per_second,
    tokens_per_stage, ...
  """
  if config.pruning.name not in POLICIES:
    raise ValueError(f'config.pruning.name={config.pruning.name!r} is not '
                     f'available for segmentation yet; known: {POLICIES}.')
  result, images, windows_per_image, num = evaluate_quality(
      config, model, params, prep)

  apply = lambda p, x: model.apply({'params': p}, x)
  batch = images.shape[0]
  forward_hw = images.shape[1:3]
  realized = flops.realized_gflops(apply, params, images, batch_size=batch)
  effective = 2 * flops.segmenter_macs(model, forward_hw) / 1e9
  forwards_per_second = speed.images_per_second(
      jax.jit(apply), params, images, batch_size=batch,
      warmup=config.eval.warmup, iters=config.eval.timing_iters,
      rounds=config.eval.timing_rounds)
  p = model.patch_size
  tokens = (-(-forward_hw[0] // p)) * (-(-forward_hw[1] // p)) + model.num_prefix
  return dict(
      name=config.eval.name or config.pruning.name,
      policy=config.pruning.name,
      params={},
      dataset=f'{config.data.name}:{config.data.split}',
      num_images=num,
      inference=dict(mode=config.eval.mode, size=list(forward_hw),
                     windows_per_image=windows_per_image),
      miou=result['miou'],
      boundary_miou=result['boundary_miou'],
      pixel_accuracy=result['pixel_accuracy'],
      gflops_realized=realized * windows_per_image,
      gflops_effective=float(effective) * windows_per_image,
      images_per_second=forwards_per_second / windows_per_image,
      batch_size=batch,
      stage_starts=[0],
      tokens_per_stage=[float(tokens)],
  )


def config_defaults() -> ml_collections.ConfigDict:
  """config.eval fields segmentation evaluation reads (documented defaults)."""
  return ml_collections.ConfigDict(dict(
      name='',            # row name ('' = the policy name)
      mode='slide',       # 'whole' (fixed-size batches) or 'slide' (official)
      size=0,             # whole: pad every image to size x size
      short_size=512,     # resize the short side to this (0: keep the size)
      long_max=2048,      # ... with the long side at most this
      window=512,         # slide: window side
      stride=480,         # slide: window stride
      boundary_width=0,   # boundary band in px (0: 2% of the image diagonal)
      progress=True,      # progress bar on stderr
      warmup=2,           # untimed calls before timing
      timing_iters=5,     # calls per timing round
      timing_rounds=3,    # rounds; the median is reported
  ))

