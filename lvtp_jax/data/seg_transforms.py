"""Per-example semantic-segmentation transforms in NumPy + PIL.

These reproduce the train and eval pipelines the official Segmenter code
builds from mmseg 0.x configs (see specs/weights_and_data.md §2.6-§2.7):

  train: Resize(img_scale, ratio_range=(0.5, 2.0), keep_ratio)
         -> RandomCrop(crop, cat_max_ratio=0.75) -> RandomFlip(0.5)
         -> PhotoMetricDistortion -> Normalize -> Pad(crop, 0, seg 255)
  eval:  Resize(keep_ratio, short side -> im_size) -> Normalize

An example is a dict {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}
with class ids and 255 = ignore. Randomness comes from an explicit
`np.random.Generator`, so the caller decides what it is seeded from.

Units: `normalize` takes mean/std in 0..255 units and is applied to the
uint8 image as it is, which is what Segmenter's mmseg configs do (its STATS
multiplied by 255: 'vit' mean = std = 127.5). `SEGMENTER_NORMALIZATION` holds
both of Segmenter's settings.

Resampling: PIL bilinear for images, PIL nearest for labels. mmseg uses cv2,
whose bilinear does not antialias when downscaling while PIL's does, so
downscaled training images are slightly smoother than mmseg's; upscaling
agrees up to rounding.
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IGNORE_INDEX = 255

# Segmenter's `segm/data/utils.py` STATS x 255, rounded to 2 decimals as its
# `BaseMMSeg` does (these differ slightly from mmseg's ImageNet constants).
SEGMENTER_NORMALIZATION = {
    'vit': ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    'deit': ((123.68, 116.28, 103.53), (58.4, 57.12, 57.38)),
}


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def image_and_label(example: Mapping[str, Any]) -> Tuple[np.ndarray,
                                                        np.ndarray]:
  """Validated (image uint8 [H, W, 3], label uint8 [H, W]) of an example.

  A label [H, W, 1] is squeezed. Image and label must have the same height
  and width: resizing one to the other would hide a bug in the dataset.

  Args:
    example: dict with 'image' and 'segmentation'.

  Returns:
    (image, label) as NumPy arrays.
  """
  image = np.asarray(example['image'])
  label = np.asarray(example['segmentation'])
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f'expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}.')
  if label.dtype != np.uint8 or label.ndim != 2:
    raise ValueError(
        f'expected a uint8 segmentation [H, W] of class ids (255 = ignore), '
        f'got {label.dtype} {label.shape}.')
  if image.shape[:2] != label.shape:
    raise ValueError(
        f'image {image.shape[:2]} and segmentation {label.shape} differ in '
        'size; the dataset must give aligned image/label pairs.')
  return image, label


def rescale_shape(height: int, width: int,
                  scale: Tuple[float, float]) -> Tuple[int, int]:
  """Size after a keep-ratio rescale into `scale` = (long_max, short_max).

  mmcv `rescale_size`: factor = min(long_max / long, short_max / short), new
  size int(w * factor + 0.5) x int(h * factor + 0.5). With ADE20K's
  (2048, 512) this sets the short side to 512 unless the image is very
  elongated.

  Args:
    height: input height.
    width: input width.
    scale: (long_max, short_max) in pixels.

  Returns:
    (new_height, new_width).
  """
  long_max, short_max = max(scale), min(scale)
  factor = min(long_max / max(height, width), short_max / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], height: int,
                width: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Resizes the image bilinearly and the label (if any) with nearest.

  Nearest keeps label values exact (no invented classes at boundaries).

  Args:
    image: uint8 [H, W, 3].
    label: uint8 [H, W] or None.
    height: output height.
    width: output width.

  Returns:
    (uint8 [height, width, 3], uint8 [height, width] or None).
  """
  if image.shape[:2] == (height, width):
    return image, label
  image = np.asarray(
      Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
  if label is not None:
    label = np.asarray(
        Image.fromarray(label).resize((width, height),
                                      Image.Resampling.NEAREST))
  return image, label


def random_rescale(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
    ratio_range: Tuple[float, float],
    base_scale: Optional[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
  """mmseg `Resize(img_scale=base_scale, ratio_range, keep_ratio=True)`.

  A ratio r ~ U(ratio_range) scales the target to (int(long * r),
  int(short * r)); the image is then rescaled keeping its aspect to fit it.

  Args:
    image: uint8 [H, W, 3].
    label: uint8 [H, W].
    rng: randomness.
    ratio_range: (min_ratio, max_ratio), e.g. (0.5, 2.0).
    base_scale: (long, short), e.g. (2048, 512) for ADE20K; None uses the
      image's own size, so the image is scaled by about r (small synthetic
      images).

  Returns:
    (uint8 [H', W', 3], uint8 [H', W']).
  """
  height, width = image.shape[:2]
  if base_scale is None:
    base_scale = (max(height, width), min(height, width))
  ratio = rng.uniform(*ratio_range)
  scale = (int(max(base_scale) * ratio), int(min(base_scale) * ratio))
  return resize_pair(image, label, *rescale_shape(height, width, scale))


def _crop_offsets(rng: np.random.Generator, height: int, width: int,
                  crop_size: int) -> Tuple[int, int]:
  """Uniform top-left corner; 0 along a side shorter than the crop."""
  top = rng.integers(0, max(height - crop_size, 0) + 1)
  left = rng.integers(0, max(width - crop_size, 0) + 1)
  return int(top), int(left)


def _dominant_fraction(label: np.ndarray, ignore_index: int) -> float:
  """Largest class share among non-ignored pixels (1.0 if all are ignored).

  A single-class crop scores 1.0, so it is always rejected, as mmseg's
  "at least two classes" condition does.
  """
  counts = np.bincount(label.ravel(), minlength=256)
  counts[ignore_index] = 0
  if not counts.any():
    return 1.0
  return counts.max() / counts.sum()


def random_crop(image: np.ndarray, label: np.ndarray,
                rng: np.random.Generator, *, crop_size: int,
                cat_max_ratio: Optional[float],
                ignore_index: int) -> Tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`.

  With cat_max_ratio, a crop whose largest class covers >= cat_max_ratio of
  its non-ignored pixels is redrawn, up to 10 times; as in mmseg the crop
  drawn after the 10th rejection is used unchecked.

  Args:
    image: uint8 [H, W, 3].
    label: uint8 [H, W].
    rng: randomness.
    crop_size: side of the square crop; sides already shorter stay whole.
    cat_max_ratio: e.g. 0.75; None (or >= 1) disables the check.
    ignore_index: label value excluded from the class counts.

  Returns:
    (uint8 [h, w, 3], uint8 [h, w]) with h = min(H, crop_size), same for w.
  """
  height, width = label.shape

  def crop(offsets):
    top, left = offsets
    return (slice(top, top + crop_size), slice(left, left + crop_size))

  window = crop(_crop_offsets(rng, height, width, crop_size))
  if cat_max_ratio is not None and cat_max_ratio < 1:
    for _ in range(10):
      if _dominant_fraction(label[window], ignore_index) < cat_max_ratio:
        break
      window = crop(_crop_offsets(rng, height, width, crop_size))
  return image[window], label[window]


def random_flip(image: np.ndarray, label: np.ndarray,
                rng: np.random.Generator,
                prob: float) -> Tuple[np.ndarray, np.ndarray]:
  """Flips image [H, W, 3] and label [H, W] left-right together with `prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def _affine_uint8(values: np.ndarray, alpha: float = 1.0,
                  beta: float = 0.0) -> np.ndarray:
  """values * alpha + beta, clipped to 0..255 and truncated to uint8.

  The same float32 arithmetic and truncation as mmseg's
  `PhotoMetricDistortion.convert`.
  """
  out = values.astype(np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(out, 0, 255).astype(np.uint8)


def _map_hsv(image: np.ndarray, channel: int, fn) -> np.ndarray:
  """Applies fn to one uint8 HSV channel (0 = hue, 1 = saturation) of RGB.

  PIL's HSV is uint8 with the hue circle in 0..255; mmseg goes through cv2's
  uint8 HSV (hue in 0..179), an equally lossy round trip.
  """
  bands = list(Image.fromarray(image).convert('HSV').split())
  bands[channel] = Image.fromarray(fn(np.asarray(bands[channel])))
  return np.asarray(Image.merge('HSV', bands).convert('RGB'))


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness_delta: float = 32,
    contrast_range: Tuple[float, float] = (0.5, 1.5),
    saturation_range: Tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18) -> np.ndarray:
  """mmseg 0.x `PhotoMetricDistortion` on a uint8 RGB image [H, W, 3].

  In order, each with probability 1/2: brightness (add U(-delta, delta)),
  contrast (multiply by U(range)) either here or last (a coin decides),
  saturation (scale HSV saturation by U(range)), hue (shift by an integer in
  [-hue_delta, hue_delta) in cv2 units of 2 degrees). Every step clips to
  0..255 and returns uint8, as in mmseg.

  Args:
    image: uint8 [H, W, 3].
    rng: randomness.
    brightness_delta: largest brightness offset, in 0..255 units.
    contrast_range: (low, high) contrast factor.
    saturation_range: (low, high) saturation factor.
    hue_delta: largest hue shift in cv2 hue units (180 per circle).

  Returns:
    uint8 [H, W, 3].
  """
  if rng.integers(2):
    image = _affine_uint8(
        image, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_last = rng.integers(2) == 0
  if not contrast_last and rng.integers(2):
    image = _affine_uint8(image, alpha=rng.uniform(*contrast_range))
  if rng.integers(2):
    alpha = rng.uniform(*saturation_range)
    image = _map_hsv(image, 1, lambda s: _affine_uint8(s, alpha=alpha))
  if rng.integers(2) and hue_delta > 0:
    # cv2 hue units (180 per circle) -> PIL's (256 per circle).
    shift = int(round(int(rng.integers(-hue_delta, hue_delta)) * 256 / 180))
    image = _map_hsv(
        image, 0, lambda h: ((h.astype(np.int32) + shift) % 256).astype(
            np.uint8))
  if contrast_last and rng.integers(2):
    image = _affine_uint8(image, alpha=rng.uniform(*contrast_range))
  return image


def normalize(image: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel, with mean/std in 0..255 units.

  Args:
    image: uint8 [..., 3].
    mean: 3 floats in 0..255 units, e.g. SEGMENTER_NORMALIZATION['vit'][0].
    std: 3 floats in 0..255 units.

  Returns:
    float32 [..., 3].
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(
        f'mean {mean.shape} and std {std.shape} need 3 values each, in '
        '0..255 units (e.g. 127.5 for Segmenter "vit").')
  if mean.max() <= 1 and std.max() <= 1:
    raise ValueError(
        f'mean {mean.tolist()} / std {std.tolist()} look like 0..1 units; '
        'segmentation normalisation takes 0..255 units (multiply by 255).')
  return (image.astype(np.float32) - mean) / std


def pad_to(image: np.ndarray, label: Optional[np.ndarray], size: int,
           ignore_index: int = IGNORE_INDEX):
  """Pads bottom/right to [size, size] as mmseg `Pad(size, 0, seg_pad_val)`.

  The image gets 0 and is normally already normalised (mmseg pads after
  Normalize, so padding is the mean colour; Segmenter's forward also pads
  normalised inputs with 0). The label gets ignore_index.

  Args:
    image: [h, w, 3] with h, w <= size.
    label: [h, w] or None.
    size: output side.
    ignore_index: label padding value.

  Returns:
    (image [size, size, 3], label [size, size] or None, valid bool
    [size, size] that is True on the original pixels).
  """
  height, width = image.shape[:2]
  if height > size or width > size:
    raise ValueError(f'cannot pad a {height}x{width} image to {size}x{size}.')
  padding = ((0, size - height), (0, size - width))
  image = np.pad(image, padding + ((0, 0),))
  if label is not None:
    label = np.pad(label, padding, constant_values=ignore_index)
  valid = np.pad(np.ones((height, width), bool), padding)
  return image, label, valid


# ----------------------------------------------------------------------------
# Full pipelines.
# ----------------------------------------------------------------------------


def train_transform(example: Mapping[str, Any],
                    rng: np.random.Generator,
                    *,
                    crop_size: int,
                    mean: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][0],
                    std: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][1],
                    base_scale: Optional[Tuple[int, int]] = None,
                    ratio_range: Tuple[float, float] = (0.5, 2.0),
                    cat_max_ratio: Optional[float] = 0.75,
                    flip_prob: float = 0.5,
                    photometric: bool = True,
                    ignore_index: int = IGNORE_INDEX) -> Dict[str, np.ndarray]:
  """Segmenter/mmseg training augmentation of one example.

  Rescale -> crop -> flip -> photometric distortion -> normalise -> pad, in
  mmseg's order, all randomness from `rng` in a fixed order of draws.

  Args:
    example: {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}.
    rng: the example's generator.
    crop_size: output side S.
    mean: per-channel mean in 0..255 units.
    std: per-channel std in 0..255 units.
    base_scale: (long, short) img_scale, e.g. (2048, 512) for ADE20K; None
      uses each image's own size.
    ratio_range: random rescale ratio range.
    cat_max_ratio: RandomCrop's class-dominance limit; None disables.
    flip_prob: horizontal flip probability.
    photometric: apply `photometric_distortion`.
    ignore_index: label value for ignored / padded pixels.

  Returns:
    dict(image=float32 [S, S, 3], segmentation=int32 [S, S]).
  """
  image, label = image_and_label(example)
  image, label = random_rescale(
      image, label, rng, ratio_range=ratio_range, base_scale=base_scale)
  image, label = random_crop(
      image, label, rng, crop_size=crop_size, cat_max_ratio=cat_max_ratio,
      ignore_index=ignore_index)
  image, label = random_flip(image, label, rng, flip_prob)
  if photometric:
    image = photometric_distortion(np.ascontiguousarray(image), rng)
  image, label, _ = pad_to(
      normalize(image, mean, std), label, crop_size, ignore_index)
  return dict(image=image, segmentation=label.astype(np.int32))


def eval_resize_shape(height: int, width: int, *, short_size: int,
                      long_max: int) -> Tuple[int, int]:
  """Eval size: keep ratio, short side -> short_size, long side <= long_max.

  Segmenter evaluates with mmseg `Resize(img_scale=(ratio * im_size,
  im_size), keep_ratio=True)`: factor = min(long_max / long, short_size /
  short), size int(h * f + 0.5) x int(w * f + 0.5). ADE20K: (2048, 512).

  Args:
    height: original height.
    width: original width.
    short_size: target short side (Segmenter's im_size).
    long_max: cap on the long side (ratio * im_size).

  Returns:
    (new_height, new_width).
  """
  return rescale_shape(height, width, (long_max, short_size))


def eval_transform(example: Mapping[str, Any],
                   *,
                   short_size: int,
                   long_max: int,
                   mean: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][0],
                   std: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][1]
                   ) -> Dict[str, np.ndarray]:
  """Segmenter's single-scale eval preprocessing of one example.

  The resized image goes to sliding-window inference; predictions are then
  resized back to the original label's size, where mIoU is computed (as
  `segm/eval/miou.py` does).

  Args:
    example: {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}.
    short_size: target short side, e.g. 512.
    long_max: cap on the long side, e.g. 2048.
    mean: per-channel mean in 0..255 units.
    std: per-channel std in 0..255 units.

  Returns:
    dict(image=float32 [H', W', 3] resized and normalised,
    segmentation=int32 [H, W] original labels).
  """
  image, label = image_and_label(example)
  new_size = eval_resize_shape(
      *image.shape[:2], short_size=short_size, long_max=long_max)
  image, _ = resize_pair(image, None, *new_size)
  return dict(image=normalize(image, mean, std),
              segmentation=label.astype(np.int32))


def eval_transform_padded(
    example: Mapping[str, Any],
    *,
    size: int,
    mean: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][0],
    std: Sequence[float] = SEGMENTER_NORMALIZATION['vit'][1],
    short_size: Optional[int] = None,
    long_max: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX) -> Dict[str, np.ndarray]:
  """Fixed-shape eval preprocessing: optional eval resize, then pad to size.

  For whole-image inference in fixed-shape batches (e.g. small synthetic
  images). Without short_size the image keeps its size, so the labels are
  the original ones; with it, labels are resized with nearest to the image
  and metrics are computed at that resolution, not the original one.

  Args:
    example: {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}.
    size: output side S; the (resized) image must fit in it.
    mean: per-channel mean in 0..255 units.
    std: per-channel std in 0..255 units.
    short_size: if set, resize as `eval_resize_shape` first.
    long_max: cap on the long side for the resize; defaults to size.
    ignore_index: label value of padded pixels.

  Returns:
    dict(image=float32 [S, S, 3] (0 in the padding), segmentation=int32
    [S, S] (ignore_index in the padding), pixel_mask=bool [S, S]).
  """
  image, label = image_and_label(example)
  if short_size is not None:
    new_size = eval_resize_shape(
        *image.shape[:2], short_size=short_size,
        long_max=size if long_max is None else long_max)
    image, label = resize_pair(image, label, *new_size)
  if max(image.shape[:2]) > size:
    raise ValueError(
        f'a {image.shape[0]}x{image.shape[1]} image does not fit in '
        f'{size}x{size}; raise size or resize with short_size/long_max.')
  image, label, valid = pad_to(
      normalize(image, mean, std), label, size, ignore_index)
  return dict(image=image, segmentation=label.astype(np.int32),
              pixel_mask=valid)
