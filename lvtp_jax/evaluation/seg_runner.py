"""The evaluation passes over a dataset split, with per-forward token counts.

`run_split` runs a (possibly pruned) Segmenter over the first images of a
split, in 'whole' or 'slide' mode (see segmentation.py), feeds the
predictions to SegmentationMetrics and collects, for every real forward
(an image in 'whole' mode, a window in 'slide' mode; padding rows of a
batch are left out):
  tokens_per_block  [F, depth] valid patch tokens each encoder block
                    processed (the input of the effective FLOP count)
  overflow          [F, stages] patches force-exited by the overflow rule
  exit maps         exit stage per patch of the first few forwards, with
                    their image, label and prediction (for the pictures)
  token accuracy    'whole' mode with a baseline (the unpruned model): the
                    patch-level accuracy (against the majority label of the
                    patch, lvtp_jax.train.losses.token_targets) of the
                    patches that exited and of those that stayed, for the
                    pruned model and for the unpruned one on the same
                    patches: where a policy's mIoU loss comes from
Pruning decisions are per forward, so per window in 'slide' mode, as the
official DToP evaluation.
"""

import dataclasses
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

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
from lvtp_jax.train import losses


@dataclasses.dataclass
class ForwardStats:
  """Per-forward pruning statistics of one evaluation pass."""
  num_prefix: int
  max_maps: int = 0
  tokens_per_block: List[np.ndarray] = dataclasses.field(default_factory=list)
  # In-block reductions: valid patch tokens each block's MLP ran on.
  mlp_tokens_per_block: List[np.ndarray] = dataclasses.field(
      default_factory=list)
  overflow: List[np.ndarray] = dataclasses.field(default_factory=list)
  maps: List[Dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
  # [exited, stayed] x [patches, pruned correct, unpruned correct]
  token_counts: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((2, 3), np.int64))

  def add_token_accuracy(self, aux: Dict[str, Any], base_aux: Dict[str, Any],
                         labels: np.ndarray, rows: np.ndarray,
                         patch: int) -> None:
    """Counts patch-level accuracy of exited / stayed patches (see above)."""
    c = aux['token_logits'].shape[-1]
    targets, known = (np.asarray(a) for a in losses.token_targets(
        jnp.asarray(labels), patch, c))
    known = known & rows[:, None]
    pruned = np.asarray(aux['token_logits']).argmax(-1) == targets
    unpruned = np.asarray(base_aux['token_logits']).argmax(-1) == targets
    exited = np.asarray(aux['exit_stage']) < aux['overflow'].shape[1]
    for i, group in enumerate((exited & known, ~exited & known)):
      self.token_counts[i] += [group.sum(), (pruned & group).sum(),
                               (unpruned & group).sum()]

  def token_accuracy(self) -> Optional[Dict[str, Any]]:
    """{'exited'|'stayed': {'patches', 'pruned', 'unpruned'}} in percent
    (None for a group without patches)."""
    if not self.token_counts[:, 0].sum():
      return None
    out = {}
    for i, name in enumerate(('exited', 'stayed')):
      n, pruned, unpruned = (int(v) for v in self.token_counts[i])
      out[name] = dict(patches=n,
                       pruned=100.0 * pruned / n if n else None,
                       unpruned=100.0 * unpruned / n if n else None)
    return out

  def add(self, aux: Dict[str, Any], rows: np.ndarray,
          images: Optional[np.ndarray] = None,
          labels: Optional[np.ndarray] = None,
          preds: Optional[np.ndarray] = None) -> None:
    """Adds the forwards `rows` (bool [n]) of one batch's aux outputs."""
    if 'tokens_per_block' in aux:
      self.tokens_per_block.append(np.asarray(aux['tokens_per_block'])[rows])
      if 'mlp_tokens_per_block' in aux:   # an in-block reduction ran
        self.mlp_tokens_per_block.append(
            np.asarray(aux['mlp_tokens_per_block'])[rows])
      if 'overflow' in aux:               # an exit policy ran
        self.overflow.append(np.asarray(aux['overflow'])[rows])
    else:  # the unpruned model: every patch in every block
      self.tokens_per_block.append(
          np.asarray(aux['valid_tokens'])[rows] - self.num_prefix)
    # In-block reductions: the final slot of every patch (merge maps).
    state = aux.get('state') if 'mlp_tokens_per_block' in aux else None
    if ('exit_stage' not in aux and state is None) or not self.max_maps:
      return
    grid = tuple(int(g) for g in np.asarray(aux['grid']))
    for i in np.flatnonzero(rows):
      if len(self.maps) >= self.max_maps:
        break
      self.maps.append(dict(
          exit_stage=(np.asarray(aux['exit_stage'][i]).reshape(grid)
                      if 'exit_stage' in aux else None),
          src=None if state is None else np.asarray(state.src[i]),
          grid=grid,
          image=None if images is None else np.asarray(images[i]),
          label=None if labels is None else np.asarray(labels[i]),
          pred=None if preds is None else np.asarray(preds[i])))

  def tokens(self) -> np.ndarray:
    return np.concatenate(self.tokens_per_block)

  def mlp_tokens(self) -> Optional[np.ndarray]:
    """[F, depth] for an in-block reduction, else None."""
    return (np.concatenate(self.mlp_tokens_per_block)
            if self.mlp_tokens_per_block else None)

  def overflows(self) -> Optional[np.ndarray]:
    return np.concatenate(self.overflow) if self.overflow else None


def forward_fn(model, params, labels: bool = False
               ) -> Callable[[jax.Array], Tuple[jax.Array, Any]]:
  """jitted images -> (logits [n, H, W, C], aux) for a Segmenter; with
  labels=True the class map [n, H, W] instead of the logits."""
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, return_aux=True,
                                         labels=labels))
  return lambda x: fwd(params, x)


def _progress(it, total, cfg, desc='eval'):
  return tqdm.tqdm(it, total=total, unit='it', desc=desc, file=sys.stderr,
                   disable=not cfg.eval.progress)


def _whole(fwd, source, cfg, mean, std, metrics, num, stats, desc,
           baseline=None, patch=16):
  """Batched whole-image inference; returns (one batch of inputs, 1.0)."""
  ecfg = cfg.eval
  batches = seg_data.eval_batches(
      source, batch_size=cfg.data.batch_size, size=ecfg.size,
      num_examples=num, mean=mean, std=std,
      short_size=ecfg.short_size or None, long_max=ecfg.long_max or None)
  images = None
  for batch in _progress(batches, -(-num // cfg.data.batch_size), cfg, desc):
    out, aux = fwd(batch['image'])    # labels [n, H, W] or logits
    pred = np.asarray(out if out.ndim == 3 else jnp.argmax(out, axis=-1))
    pixel_mask = batch['pixel_mask'] & batch['mask'][:, None, None]
    metrics.update(pred, batch['segmentation'], mask=pixel_mask)
    rows = np.asarray(batch['mask'])
    stats.add(aux, rows, batch['image'], batch['segmentation'], pred)
    if baseline is not None and 'exit_stage' in aux:
      stats.add_token_accuracy(aux, baseline(batch['image'])[1],
                               batch['segmentation'], rows, patch)
    images = batch['image']
  return jnp.asarray(images), 1.0


def _slide(fwd, source, cfg, mean, std, metrics, num, stats, desc,
           baseline=None, patch=16):
  """Official sliding-window inference, one image at a time."""
  del baseline, patch  # token accuracy: 'whole' mode only
  ecfg = cfg.eval
  windows = []
  for i in _progress(range(num), num, cfg, desc):
    ex = seg_transforms.eval_transform(
        source[i], short_size=ecfg.short_size, long_max=ecfg.long_max,
        mean=mean, std=std)
    image = inference.upsample_to_window(jnp.asarray(ex['image']), ecfg.window)
    recorded = []

    def predict(x):
      logits, aux = fwd(x)
      recorded.append((x, aux))
      return logits

    probs = inference.segment(
        predict, image, out_size=ex['segmentation'].shape, mode='slide',
        window=ecfg.window, stride=ecfg.stride, batch_size=cfg.data.batch_size)
    metrics.update(np.asarray(jnp.argmax(probs, -1)), ex['segmentation'])
    h, w = image.shape[:2]
    count = (len(inference.window_anchors(h, ecfg.window, ecfg.stride)) *
             len(inference.window_anchors(w, ecfg.window, ecfg.stride)))
    windows.append(count)
    # The last batch of windows is padded; its padding rows come last.
    for x, aux in recorded:
      rows = np.arange(x.shape[0]) < count
      stats.add(aux, rows, x)
      count -= int(rows.sum())
  crops = jnp.zeros((cfg.data.batch_size, ecfg.window, ecfg.window, 3))
  return crops, float(np.mean(windows))


def run_split(config: ml_collections.ConfigDict, model, params,
              prep: Dict[str, Any], *, split: Optional[str] = None,
              num_examples: int = 0, max_maps: int = 0, desc: str = 'eval',
              baseline: Optional[Callable] = None,
              forward: Optional[Callable] = None, per_image: bool = False
              ) -> Tuple[Dict[str, Any], jax.Array, float, int, ForwardStats]:
  """Segmentation metrics and token statistics of (model, params).

  Args:
    config: reads config.data, config.eval (config.model is not read).
    model: the Segmenter, pruned or not (lvtp_jax.pruning.attach).
    params: its parameters.
    prep: dict with 'mean' and 'std' in 0..1 units, as the images the model
      was trained on were normalised.
    split: the split to read (default config.data.split).
    num_examples: the first this many images (0: config.data.num_examples,
      where 0 means the whole split).
    max_maps: exit maps to keep (ForwardStats.maps).
    desc: progress-bar label.
    baseline: forward_fn of the unpruned model, for the token accuracies
      ('whole' mode).
    forward: images -> (logits or labels, aux) to score instead of
      forward_fn(model, params) (lvtp_jax.evaluation.loss_split).
    per_image: the metric dict also holds 'image_confusion' and
      'image_boundary_confusion', int64 [images, C, C] each
      (SegmentationMetrics.image_confusions; lvtp_jax.evaluation.paired).

  Returns:
    (metrics, forward_batch, windows_per_image, num_images, stats): the
    metric dict of SegmentationMetrics.result(), one batch of forward
    inputs (for FLOPs and timing), the average forwards per image, the
    number of images and the ForwardStats.
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
      config.data.name, split or config.data.split,
      config.data.data_dir or None)
  limit = num_examples or config.data.num_examples
  num = min(limit, len(source)) if limit else len(source)
  # Converted checkpoints store mean/std in 0..1; the segmentation transforms
  # normalise uint8 images in 0..255 units.
  mean = tuple(255.0 * m for m in prep['mean'])
  std = tuple(255.0 * s for s in prep['std'])
  metrics = segmentation_metrics.SegmentationMetrics(
      model.num_classes, ignore_index=dataset.ignore_index,
      boundary_width=config.eval.boundary_width or None, per_image=per_image)
  stats = ForwardStats(num_prefix=model.num_prefix, max_maps=max_maps)
  run = _whole if config.eval.mode == 'whole' else _slide
  # Whole images need labels only (the upsampling fuses with the argmax);
  # sliding windows average probabilities, so they need the logits.
  fwd = forward or forward_fn(model, params,
                              labels=config.eval.mode == 'whole')
  images, windows_per_image = run(fwd, source, config,
                                  mean, std, metrics, num, stats, desc,
                                  baseline, model.patch_size)
  result = metrics.result()
  if per_image:
    result['image_confusion'], result['image_boundary_confusion'] = (
        metrics.image_confusions())
  return result, images, windows_per_image, num, stats
