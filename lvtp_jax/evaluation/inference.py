"""Whole-image and sliding-window segmentation inference, as the official code.

Official protocol (rstrudel/segmenter `segm/model/utils.py`, `segm/eval/miou.py`;
../shared/specs/weights_and_data.md §2.6), for one image already resized so
its short side is the dataset's test size (512 on ADE20K):
  1. if the short side is below the window, upsample (bilinear) so it equals
     the window; never downsample;
  2. windows of `window` x `window` at anchors
     [a for a in range(0, H, stride) if a < H - window] + [H - window]
     along each axis;
  3. the model's logits of every window, summed where windows overlap and
     divided by the number of windows covering each pixel;
  4. bilinear resize of the merged logits to the output size (the original
     image size), then softmax over classes.

Windows go through the model in fixed-size batches (the last one padded), so
the jitted model compiles once per window size, whatever the image size.
"""

from typing import Callable, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('whole', 'slide')

PredictFn = Callable[[jax.Array], jax.Array]  # [n, h, w, 3] -> [n, h, w, C]


def upsample_to_window(image: jax.Array, window: int) -> jax.Array:
  """Step 1: bilinear upsampling so the short side is >= window.

  image [H, W, 3] -> [H', W', 3]. The official `resize` computes the long
  side as ratio * window and truncates it with int().
  """
  h, w = image.shape[:2]
  if min(h, w) >= window:
    return image
  if h < w:
    new_hw = (window, int(w / h * window))
  else:
    new_hw = (int(h / w * window), window)
  return jax.image.resize(image, new_hw + image.shape[2:], 'linear',
                          antialias=False)


def window_anchors(size: int, window: int, stride: int) -> List[int]:
  """Step 2: window starts along one axis of length `size` >= window."""
  if size < window:
    raise ValueError(f'axis of {size} px is shorter than the window {window}; '
                     'upsample_to_window first.')
  return [a for a in range(0, size, stride) if a < size - window] + [
      size - window]


def _run_batched(predict_fn: PredictFn, crops: jax.Array,
                 batch_size: int) -> jax.Array:
  """predict_fn over [n, h, w, 3] crops in fixed batches -> [n, h, w, C]."""
  n = crops.shape[0]
  pad = -n % batch_size
  crops = jnp.concatenate(
      [crops, jnp.zeros((pad,) + crops.shape[1:], crops.dtype)])
  outs = [predict_fn(crops[i:i + batch_size])
          for i in range(0, n + pad, batch_size)]
  return jnp.concatenate(outs)[:n]


def sliding_window_logits(predict_fn: PredictFn, image: jax.Array, *,
                          window: int, stride: int,
                          batch_size: int) -> jax.Array:
  """Steps 1-3: merged window logits [H', W', C] over the upsampled image."""
  if not 0 < stride <= window:
    raise ValueError(f'window stride must be in (0, window={window}], got '
                     f'{stride}.')
  image = upsample_to_window(image, window)
  h, w = image.shape[:2]
  anchors = [(y, x) for y in window_anchors(h, window, stride)
             for x in window_anchors(w, window, stride)]
  crops = jnp.stack([image[y:y + window, x:x + window] for y, x in anchors])
  logits = _run_batched(predict_fn, crops, batch_size)
  total = jnp.zeros((h, w, logits.shape[-1]), jnp.float32)
  count = np.zeros((h, w, 1), np.float32)
  for (y, x), crop_logits in zip(anchors, logits):
    total = total.at[y:y + window, x:x + window].add(crop_logits)
    count[y:y + window, x:x + window] += 1
  return total / count


def segment(predict_fn: PredictFn, image: jax.Array, *, out_size: Sequence[int],
            mode: str = 'slide', window: int = 512, stride: int = 480,
            batch_size: int = 4) -> jax.Array:
  """Class probabilities [out_h, out_w, C] for one image [H, W, 3].

  mode 'slide' is the official evaluation (steps 1-4); 'whole' runs the model
  once on the full image (the model pads it to a multiple of the patch) and
  resizes the logits to out_size before the softmax.
  """
  if mode not in MODES:
    raise ValueError(f'inference mode {mode!r}; expected one of {MODES}.')
  if mode == 'whole':
    logits = predict_fn(image[None])[0]
  else:
    logits = sliding_window_logits(predict_fn, image, window=window,
                                   stride=stride, batch_size=batch_size)
  logits = jax.image.resize(logits, tuple(out_size) + logits.shape[-1:],
                            'linear', antialias=False)
  return jax.nn.softmax(logits, axis=-1)


def predict_fn_for(model, params) -> PredictFn:
  """A jitted images -> logits function of a Segmenter (compiles per shape)."""
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return lambda x: fwd(params, x)

