"""Image classification data: timm's eval preprocessing and TFDS reading.

Three parts, each usable alone:

* `eval_transform` reproduces the evaluation transform timm 1.0 builds for a
  model's pretrained config (`timm.data.create_transform(
  **timm.data.resolve_data_config({}, model=m))`): shorter side resized to
  floor(img_size / crop_pct) with PIL, center crop, scale to [0, 1],
  normalize. PIL does the resampling, exactly as torchvision's `Resize` does
  on PIL images, so the result matches timm to float32 rounding.
* `open_source` (from `lvtp_jax.data.sources`, re-exported here) opens a
  prepared TFDS dataset with `tfds.data_source` (array_record files, random
  access, no TensorFlow at read time) and turns "not prepared" into an error
  that says how to prepare it.
* `label_map_for_head` and `eval_batches` turn a source into fixed-shape,
  masked batches, with labels moved into the label space of the model's head
  (e.g. imagenette wnids -> ImageNet-1k indices for a 1000-class head).

Typical use:

  source = open_source('imagenette/160px-v2', 'validation')
  label_map = label_map_for_head(
      'imagenette/160px-v2', label_names(source), num_classes=1000)
  transform_fn = functools.partial(
      eval_transform, img_size=224, crop_pct=0.9,
      mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
  for batch in eval_batches(source, batch_size=256, transform_fn=transform_fn,
                            label_map=label_map):
    ...  # batch['image'] [256, 224, 224, 3], batch['label'], batch['mask']
"""

import concurrent.futures
import io
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lvtp_jax.data import sources
from lvtp_jax.data.constants import IMAGENET_DEFAULT_MEAN  # pylint: disable=unused-import
from lvtp_jax.data.constants import IMAGENET_DEFAULT_STD  # pylint: disable=unused-import
from lvtp_jax.data.constants import IMAGENET_INCEPTION_MEAN  # pylint: disable=unused-import
from lvtp_jax.data.constants import IMAGENET_INCEPTION_STD  # pylint: disable=unused-import
# Re-exported: callers open classification datasets through this module.
from lvtp_jax.data.sources import DatasetNotPreparedError  # pylint: disable=unused-import
from lvtp_jax.data.sources import open_source  # pylint: disable=unused-import

# timm's interpolation names (timm.data.transforms.str_to_interp_mode) and the
# PIL filter torchvision hands them to for PIL images.
_PIL_FILTERS = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
    'lanczos': Image.Resampling.LANCZOS,
}

# The first wnids of the sorted ImageNet-1k synset list; TFDS `imagenet2012`
# and timm (`imagenet_synsets.txt`) both index classes in this order.
IMAGENET1K_FIRST_WNIDS = ('n01440764', 'n01443537', 'n01484850')
IMAGENET1K_NUM_CLASSES = 1000

# TFDS `imagenette` label order (label i is IMAGENETTE_WNIDS[i]) and each
# wnid's position in the sorted ImageNet-1k wnid list. Parachute is n03888257
# (index 701); n03888605 (702) is "parallel bars", which imagenette lacks.
IMAGENETTE_WNIDS = (
    'n01440764',  # tench
    'n02102040',  # English springer
    'n02979186',  # cassette player
    'n03000684',  # chain saw
    'n03028079',  # church
    'n03394916',  # French horn
    'n03417042',  # garbage truck
    'n03425413',  # gas pump
    'n03445777',  # golf ball
    'n03888257',  # parachute
)
IMAGENETTE_TO_IMAGENET1K = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


# ----------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Returns a uint8 image [H, W, 3]; grayscale [H, W] or [H, W, 1] is tiled.

  TFDS keeps a few ImageNet JPEGs grayscale. Tiling the channel is what PIL's
  `convert('RGB')` (timm's image loader) does for mode 'L'.

  Args:
    image: uint8 [H, W], [H, W, 1] or [H, W, 3].

  Returns:
    uint8 [H, W, 3].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(
        f'expected a uint8 image, got dtype {image.dtype}; decode images to '
        'uint8 [H, W, 3] (float images are not rescaled here).')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f'expected an image of shape [H, W, 3], [H, W, 1] or [H, W], got '
        f'{image.shape}; convert RGBA / CMYK images to RGB before this step.')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def resize_scale_size(img_size: int, crop_pct: float) -> int:
  """Length of the shorter side before the center crop, as timm computes it.

  timm's `transforms_imagenet_eval` uses math.floor(img_size / crop_pct), so
  224 / 0.9 = 248.9 gives 248 (not 249) and 224 / 0.875 gives 256.

  Args:
    img_size: side of the square crop fed to the model.
    crop_pct: fraction of the resized shorter side kept by the crop.

  Returns:
    The target length of the shorter side.
  """
  if not crop_pct > 0:
    raise ValueError(
        f'crop_pct must be > 0, got {crop_pct}; timm configs use values '
        'such as 0.875, 0.9 or 1.0.')
  return math.floor(img_size / crop_pct)


def shorter_side_resize_shape(height: int, width: int,
                              size: int) -> Tuple[int, int]:
  """(new_height, new_width) with the shorter side set to `size`.

  Follows torchvision's `_compute_resized_output_size` for an int size: the
  longer side is int(size * long / short), i.e. truncated, not rounded. The
  expression order matters for float rounding, so it is kept as is.

  Args:
    height: input height.
    width: input width.
    size: target length of the shorter side.

  Returns:
    (new_height, new_width).
  """
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  if width <= height:
    return new_long, new_short
  return new_short, new_long


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Center crop to [size, size], zero-padding first if the image is smaller.

  Follows torchvision's `center_crop`: offsets are int(round((n - size) / 2))
  with Python's round (half to even, so an offset of 2.5 becomes 2), and a
  too-small side is padded with zeros, (size - n) // 2 before and the rest
  after. Padding only happens when crop_pct > 1.

  Args:
    image: [H, W, C].
    size: side of the square crop.

  Returns:
    [size, size, C], same dtype.
  """
  height, width = image.shape[:2]
  if size > height or size > width:
    pad_h = max(size - height, 0)
    pad_w = max(size - width, 0)
    image = np.pad(
        image,
        ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
         (0, 0)))
    height, width = image.shape[:2]
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image[top:top + size, left:left + size]


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """Scales uint8 images to [0, 1] and normalizes each channel.

  The float32 operations are the ones torchvision's ToTensor + Normalize do
  (x / 255, then (x - mean) / std), so results agree to the last bit or so.

  Args:
    images: uint8 [..., 3] (e.g. [H, W, 3] or [B, H, W, 3]).
    mean: per-channel mean, 3 floats, in [0, 1] units.
    std: per-channel std, 3 floats, in [0, 1] units.

  Returns:
    float32 [..., 3].
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
        f'normalize expects uint8 images, got dtype {images.dtype}; pass the '
        'image before any scaling to [0, 1].')
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if mean.shape != (images.shape[-1],) or std.shape != mean.shape:
    raise ValueError(
        f'mean {tuple(mean.shape)} and std {tuple(std.shape)} must each have '
        f'one value per channel ({images.shape[-1]}), e.g. '
        f'{IMAGENET_DEFAULT_MEAN}.')
  scaled = images.astype(np.float32) / np.float32(255.0)
  return (scaled - mean) / std


def eval_transform(image: np.ndarray,
                   *,
                   img_size: int,
                   crop_pct: float,
                   mean: Sequence[float],
                   std: Sequence[float],
                   interpolation: str = 'bicubic') -> np.ndarray:
  """timm's ImageNet evaluation transform ('center' crop mode) in NumPy + PIL.

  Same steps and rounding as timm 1.0.31 `transforms_imagenet_eval` with a
  square img_size: Resize(shorter side -> floor(img_size / crop_pct)) with PIL
  -> CenterCrop(img_size) -> ToTensor -> Normalize, but channels-last.

  Args:
    image: uint8 [H, W, 3], or grayscale [H, W, 1] / [H, W].
    img_size: side of the output, e.g. 224 (timm's input_size[-1]).
    crop_pct: timm's crop_pct, e.g. 0.9 for DeiT at 224, 1.0 at 384.
    mean: per-channel mean in [0, 1] units.
    std: per-channel std in [0, 1] units.
    interpolation: timm interpolation name; 'bicubic' for ViT/DeiT.

  Returns:
    float32 [img_size, img_size, 3].
  """
  if interpolation not in _PIL_FILTERS:
    raise ValueError(
        f'unknown interpolation {interpolation!r}; use one of '
        f'{sorted(_PIL_FILTERS)} (timm names).')
  rgb = to_rgb_uint8(image)
  size = resize_scale_size(img_size, crop_pct)
  new_h, new_w = shorter_side_resize_shape(rgb.shape[0], rgb.shape[1], size)
  pil = Image.fromarray(rgb)
  if (new_h, new_w) != rgb.shape[:2]:
    # PIL always antialiases when downscaling, which is what torchvision's
    # Resize does on PIL input (antialias only matters for tensors).
    pil = pil.resize((new_w, new_h), _PIL_FILTERS[interpolation])
  cropped = center_crop(np.asarray(pil), img_size)
  return normalize(cropped, mean, std)


def decode_image(value: Any) -> np.ndarray:
  """The image feature of an example as uint8 [H, W, C].

  `tfds.data_source` already decodes images to uint8 arrays (with OpenCV when
  it is installed, else PIL). Encoded bytes (e.g. read with
  `tfds.decode.SkipDecoding()`) are decoded with PIL and converted to RGB, as
  timm's ImageDataset loader does.

  Args:
    value: uint8 array [H, W, C] or [H, W], or encoded image bytes.

  Returns:
    uint8 [H, W, C] with C in {1, 3}, or [H, W].
  """
  if isinstance(value, (bytes, bytearray)):
    with Image.open(io.BytesIO(value)) as pil:
      return np.asarray(pil.convert('RGB'))
  return np.asarray(value)


# ----------------------------------------------------------------------------
# TFDS reading.
# ----------------------------------------------------------------------------


def label_names(source: Any, label_key: str = 'label') -> Sequence[str]:
  """Class names of a TFDS source's ClassLabel feature (wnids for ImageNet)."""
  return list(source.dataset_info.features[label_key].names)


def label_map_for_head(dataset_name: str, names: Sequence[str], *,
                       num_classes: int) -> Optional[np.ndarray]:
  """Maps dataset labels into the label space of a `num_classes` head.

  * imagenette with a 1000-class head: wnids -> ImageNet-1k indices.
  * imagenette with a 10-class head, imagenet2012 with a 1000-class head, any
    other dataset whose class count equals the head's: identity (None).

  The label names are checked against the wnids the mapping assumes, so a
  TFDS label-order change fails loudly instead of giving wrong accuracies.

  Args:
    dataset_name: TFDS name, e.g. 'imagenette/160px-v2'.
    names: the dataset's label names (`label_names(source)`).
    num_classes: number of logits of the model's head.

  Returns:
    int32 [len(names)] with label_map[dataset_label] = head_label, or None
    when labels are used as they are.
  """
  names = list(names)
  base = sources.base_name(dataset_name)
  if base == 'imagenette':
    if names != list(IMAGENETTE_WNIDS):
      raise ValueError(
          f'{dataset_name} label names are {names}, expected the imagenette '
          f'wnids {list(IMAGENETTE_WNIDS)} in this order; the imagenette -> '
          'ImageNet-1k map in lvtp_jax/data/classification.py must be '
          'updated for this TFDS version.')
    if num_classes == IMAGENET1K_NUM_CLASSES:
      return np.asarray(IMAGENETTE_TO_IMAGENET1K, dtype=np.int32)
  elif base == 'imagenet2012':
    if (len(names) != IMAGENET1K_NUM_CLASSES or
        tuple(names[:len(IMAGENET1K_FIRST_WNIDS)]) != IMAGENET1K_FIRST_WNIDS):
      raise ValueError(
          f'{dataset_name} has {len(names)} labels starting with {names[:3]}; '
          f'expected {IMAGENET1K_NUM_CLASSES} sorted wnids starting with '
          f'{list(IMAGENET1K_FIRST_WNIDS)} (the order timm heads use).')
  if num_classes != len(names):
    raise ValueError(
        f'a {num_classes}-class head cannot be evaluated on {dataset_name} '
        f'with {len(names)} classes: no label map is known for this pair. '
        'Use a head with as many classes as the dataset, or a 1000-class '
        'ImageNet head on imagenette.')
  return None


# ----------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------


def _make_batch(images: Sequence[np.ndarray], labels: np.ndarray,
                batch_size: int) -> Dict[str, np.ndarray]:
  """Stacks `n <= batch_size` examples and pads them to `batch_size`."""
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise ValueError(
        f'transform_fn returned images of different shapes {sorted(shapes)}; '
        'it must return one fixed shape (e.g. eval_transform crops to '
        'img_size).')
  n = len(images)
  image = np.zeros((batch_size,) + images[0].shape, np.float32)
  image[:n] = np.stack(images)
  label = np.zeros((batch_size,), np.int32)
  label[:n] = labels
  mask = np.arange(batch_size) < n
  return dict(image=image, label=label, mask=mask)


def eval_batches(source: Sequence[Dict[str, Any]],
                 *,
                 batch_size: int,
                 transform_fn: Callable[[np.ndarray], np.ndarray],
                 label_map: Optional[np.ndarray] = None,
                 num_examples: Optional[int] = None,
                 image_key: str = 'image',
                 label_key: str = 'label',
                 num_threads: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Yields fixed-shape batches of a source, in order, padded at the end.

  Every batch has batch_size rows so a jitted eval step compiles once; the
  padding rows of the last batch are zeros with mask False and must be
  excluded from metrics.

  Args:
    source: random-access examples (`open_source`), each a dict with a uint8
      image [H, W, C] (or encoded bytes) and an integer label.
    batch_size: rows per batch.
    transform_fn: uint8 [H, W, C] -> float32 [S, S, 3], e.g.
      functools.partial(eval_transform, img_size=..., ...).
    label_map: optional int [num_dataset_classes]; labels become
      label_map[label] (see `label_map_for_head`).
    num_examples: evaluate only the first num_examples examples (all when
      None or larger than the source).
    image_key: image feature name.
    label_key: label feature name.
    num_threads: threads that decode and transform examples; 0 runs them in
      the calling thread. PIL releases the GIL while resizing, so threads help.

  Yields:
    dict(image=float32 [B, S, S, 3], label=int32 [B], mask=bool [B]).
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if num_examples is not None and num_examples < 0:
    raise ValueError(
        f'num_examples must be >= 0 or None (all), got {num_examples}.')
  total = len(source) if num_examples is None else min(num_examples,
                                                       len(source))
  if label_map is not None:
    label_map = np.asarray(label_map, dtype=np.int32)

  def load(index: int) -> Tuple[np.ndarray, int]:
    # Examples are read one by one: grain reads TFDS array_record sources
    # from threads the same way, and tfds' batched `__getitems__` is broken
    # under `tfds.testing.mock_data`.
    example = source[index]
    image = transform_fn(decode_image(example[image_key]))
    return np.asarray(image, dtype=np.float32), int(example[label_key])

  pool = (concurrent.futures.ThreadPoolExecutor(num_threads)
          if num_threads > 0 else None)
  try:
    for start in range(0, total, batch_size):
      indices = range(start, min(start + batch_size, total))
      loaded = list(pool.map(load, indices) if pool else map(load, indices))
      images = [image for image, _ in loaded]
      labels = np.asarray([label for _, label in loaded], np.int64)
      if label_map is not None:
        if labels.min() < 0 or labels.max() >= len(label_map):
          raise ValueError(
              f'labels {labels.min()}..{labels.max()} fall outside the '
              f'label_map of {len(label_map)} classes; build it from this '
              "dataset's label names with label_map_for_head.")
        labels = label_map[labels]
      yield _make_batch(images, labels, batch_size)
  finally:
    if pool:
      pool.shutdown(wait=False, cancel_futures=True)
