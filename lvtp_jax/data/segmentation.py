"""Semantic-segmentation input pipelines: fixed-shape, resumable batches.

The per-example transforms (Segmenter/mmseg train augmentation, eval resize,
padding, normalisation in 0..255 units) live in `seg_transforms`; this module
turns a source into batches whose shapes never change, so jitted steps
compile once.

A source is any random-access sequence (`len()`, `[i]`) of dicts
{'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]} (class ids,
255 = ignore); image sizes may differ between examples.

Training stream. Global position p of the infinite stream is example
`perm_e[p % n]` of epoch e = p // n, where perm_e is a permutation of the n
indices drawn from `np.random.default_rng([seed, e])`; its augmentation uses
`np.random.default_rng([seed, e, index])`. Global step s is positions
[s * B, (s + 1) * B). Everything is a pure function of (seed, position), so
`train_batches(..., start_step=s)` yields exactly the batches an
uninterrupted run yields from step s on: a killed run resumes by passing the
step of its last checkpoint, with no iterator state to save.

Multi-host: process k of P builds rows [k * B / P, (k + 1) * B / P) of every
global batch, i.e. a disjoint contiguous shard; concatenating the processes'
batches in process order gives the global batch. This is the layout
`jax.make_array_from_process_local_data` expects for a batch sharded over a
data axis whose devices are ordered by process.

Why grain: `grain.MapDataset` is random access, so mapping a position to an
example is a plain `map` over `MapDataset.range` and resuming is starting the
range later, while `to_iter_dataset(ReadOptions(num_threads))` gives
order-preserving threaded prefetch (PIL releases the GIL while resizing).
Grain's own `shuffle` is not used so that the epoch permutation and the
per-example seeds are the documented NumPy ones above, independent of grain
internals.

Typical use:

  mean, std = SEGMENTER_NORMALIZATION['vit']
  batches = train_batches(source, batch_size=8, crop_size=512, seed=0,
                          start_step=step, mean=mean, std=std,
                          base_scale=(2048, 512))
  batch = next(batches)  # image [8, 512, 512, 3], segmentation [8, 512, 512]
"""

import functools
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import grain
import numpy as np

# The per-example transforms are re-exported so that one import serves users.
from lvtp_jax.data.seg_transforms import eval_resize_shape  # pylint: disable=unused-import
from lvtp_jax.data.seg_transforms import eval_transform  # pylint: disable=unused-import
from lvtp_jax.data.seg_transforms import eval_transform_padded
from lvtp_jax.data.seg_transforms import IGNORE_INDEX
from lvtp_jax.data.seg_transforms import SEGMENTER_NORMALIZATION  # pylint: disable=unused-import
from lvtp_jax.data.seg_transforms import train_transform

Source = Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Order of the source indices in one epoch, int64 [num_examples].

  Cached because every example of an epoch needs it; 4 entries cover the
  epochs that a prefetching pipeline straddles.

  Args:
    seed: training seed (>= 0).
    epoch: epoch number (>= 0).
    num_examples: source length.

  Returns:
    A permutation of range(num_examples), a function of (seed, epoch) only.
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def global_position(local_position: int, *, batch_size: int,
                    process_index: int, process_count: int) -> int:
  """Position in the global stream of this process's local_position-th row.

  Process k owns rows [k * b, (k + 1) * b) of each global batch of
  batch_size rows, where b = batch_size // process_count.

  Args:
    local_position: index of the row in this process's own stream.
    batch_size: global batch size B.
    process_index: k.
    process_count: P.

  Returns:
    Global position p; its global step is p // B.
  """
  local_batch = batch_size // process_count
  step, row = divmod(local_position, local_batch)
  return step * batch_size + process_index * local_batch + row


def train_example(source: Source, position: int, *, seed: int,
                  **transform_kwargs) -> Dict[str, np.ndarray]:
  """The augmented example at a global stream position.

  Args:
    source: random-access examples.
    position: global position p >= 0.
    seed: training seed.
    **transform_kwargs: for `seg_transforms.train_transform` (crop_size, ...).

  Returns:
    dict(image=float32 [S, S, 3], segmentation=int32 [S, S]).
  """
  epoch, offset = divmod(position, len(source))
  index = int(epoch_permutation(seed, epoch, len(source))[offset])
  rng = np.random.default_rng([seed, epoch, index])
  return train_transform(source[index], rng, **transform_kwargs)


def train_batches(source: Source,
                  *,
                  batch_size: int,
                  crop_size: int,
                  seed: int,
                  start_step: int = 0,
                  num_threads: int = 8,
                  process_index: int = 0,
                  process_count: int = 1,
                  **aug) -> Iterator[Dict[str, np.ndarray]]:
  """Endless, resumable training batches (this process's shard of each).

  Batch i of the iterator is global step start_step + i (see the module
  docstring for the exact stream and sharding rules).

  Args:
    source: random-access examples; sizes may vary.
    batch_size: global batch size B, divisible by process_count.
    crop_size: output side S.
    seed: training seed (>= 0); the only source of randomness.
    start_step: first global step to yield (resume from a checkpoint).
    num_threads: grain reader threads; 0 works in the calling thread.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    **aug: `seg_transforms.train_transform` options: mean, std (0..255
      units), base_scale, ratio_range, cat_max_ratio, flip_prob, photometric,
      ignore_index.

  Yields:
    dict(image=float32 [B / P, S, S, 3], segmentation=int32 [B / P, S, S]).
  """
  if len(source) == 0:
    raise ValueError('the training source is empty.')
  if seed < 0 or start_step < 0:
    raise ValueError(
        f'seed ({seed}) and start_step ({start_step}) must be >= 0.')
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'batch_size ({batch_size}) must be positive and divisible by '
        f'process_count ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index {process_index} is not in [0, {process_count}).')
  local_batch = batch_size // process_count
  to_global = functools.partial(
      global_position, batch_size=batch_size, process_index=process_index,
      process_count=process_count)
  load = functools.partial(
      train_example, source, seed=seed, crop_size=crop_size, **aug)
  dataset = (
      grain.MapDataset.range(start_step * local_batch, sys.maxsize)
      .map(lambda local_position: load(to_global(local_position)))
      .to_iter_dataset(grain.ReadOptions(
          num_threads=num_threads,
          # Two batches in flight keep the threads busy across batch edges.
          prefetch_buffer_size=2 * local_batch))
      .batch(local_batch))
  return iter(dataset)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def _pad_batch(rows: Dict[str, np.ndarray], batch_size: int,
               ignore_index: int) -> Dict[str, np.ndarray]:
  """Pads stacked rows [n, ...] to batch_size rows and adds 'mask' [B].

  Padding rows are empty images with all labels ignore_index and pixel_mask
  False, so a metric that skips ignored labels skips them without the mask.
  """
  n = len(rows['image'])
  fill = dict(image=0, segmentation=ignore_index, pixel_mask=False)
  batch = {}
  for key, value in rows.items():
    padded = np.full((batch_size,) + value.shape[1:], fill[key], value.dtype)
    padded[:n] = value
    batch[key] = padded
  batch['mask'] = np.arange(batch_size) < n
  return batch


def eval_batches(source: Source,
                 *,
                 batch_size: int,
                 size: int,
                 num_examples: Optional[int] = None,
                 num_threads: int = 0,
                 **transform_kwargs) -> Iterator[Dict[str, np.ndarray]]:
  """Fixed-shape eval batches in source order, the last one padded.

  Same conventions as `classification.eval_batches`: every batch has
  batch_size rows and 'mask' marks the real ones.

  Args:
    source: random-access examples.
    batch_size: rows per batch B.
    size: side S every image is padded to (see
      `seg_transforms.eval_transform_padded`).
    num_examples: evaluate only the first num_examples (all when None).
    num_threads: grain reader threads; 0 works in the calling thread.
    **transform_kwargs: for `eval_transform_padded`: mean, std (0..255
      units), short_size, long_max, ignore_index.

  Yields:
    dict(image=float32 [B, S, S, 3], segmentation=int32 [B, S, S] (255 on
    padding), pixel_mask=bool [B, S, S], mask=bool [B]).
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if num_examples is not None and num_examples < 0:
    raise ValueError(
        f'num_examples must be >= 0 or None (all), got {num_examples}.')
  total = len(source) if num_examples is None else min(num_examples,
                                                       len(source))
  load = functools.partial(eval_transform_padded, size=size,
                           **transform_kwargs)
  dataset = (
      grain.MapDataset.range(total)
      .map(lambda index: load(source[index]))
      .to_iter_dataset(grain.ReadOptions(
          num_threads=num_threads, prefetch_buffer_size=2 * batch_size))
      .batch(batch_size))
  for rows in dataset:
    yield _pad_batch(
        rows, batch_size, transform_kwargs.get('ignore_index', IGNORE_INDEX))
