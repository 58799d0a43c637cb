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
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lvtp_jax import pretrained
from lvtp_jax.convert import segmenter as seg_convert
from lvtp_jax.data import seg_transforms
from lvtp_jax.data import segmentation as seg_data
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import inference
from lvtp_jax.evaluation import segmentation_metrics
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib

POLICIES = ('none',)


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0
                ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any]]:
  """(model, params, data dict with mean/std in 0..1) from config.model."""
  if cfg.init_from:
    model, params, meta = pretrained.load(cfg.init_from)
    if meta['architecture'] != 'segmenter':
      raise ValueError(f'{cfg.init_from} holds a {meta["architecture"]!r} '
                       'model; segmentation needs a converted Segmenter.')
    return model, params, meta['data']
  if not cfg.random_init:
    raise ValueError(
        'config.model.init_from is empty: point it at a converted Segmenter '
        '(python -m lvtp_jax.convert segmenter --checkpoint checkpoint.pth '
        '--variant variant.yml --out DIR) or set '
        '--config.model.random_init=True.')
  model = seg_lib.Segmenter(
      num_classes=cfg.num_classes, img_size=cfg.img_size, decoder=cfg.decoder,
      decoder_depth=cfg.decoder_depth, aux_layers=tuple(cfg.aux_layers),
      aux_head=cfg.aux_head, **vit_lib.variant_fields(cfg.variant))
  x = jnp.zeros((1, cfg.img_size, cfg.img_size, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)['params']
  return model, params, dict(seg_convert.NORMALIZATION[cfg.normalization])


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


def evaluate(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Evaluates config.model on config.data; returns one results row."""
  model, params, prep = build_model(config.model, config.seed)
  return evaluate_model(config, model, params, prep)


def evaluate_model(config: ml_collections.ConfigDict,
                   model: seg_lib.Segmenter, params: Any,
                   prep: Dict[str, Any]) -> Dict[str, Any]:
  """`evaluate` for a given model and params (e.g. just trained).

  Args:
    config: as for `evaluate`; config.model is not read.
    model: the Segmenter.
    params: its parameters.
    prep: dict with 'mean' and 'std' in 0..1 units, as the images the model
      was trained on were normalised.

  Returns:
    One results row (see `evaluate`).
  """
  if config.pruning.name not in POLICIES:
    raise ValueError(f'config.pruning.name={config.pruning.name!r} is not '
                     f'available for segmentation yet; known: {POLICIES}.')
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
  num = len(source) if not config.data.num_examples else min(
      config.data.num_examples, len(source))
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
  result = metrics.result()

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

