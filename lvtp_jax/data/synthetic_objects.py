"""synthetic_objects: a procedural classification set where one small object
decides the label (the classification test bed, configs/quickstart_cls.py).

Each image (64 x 64 by default) holds a noisy, shaded background crossed by
thin clutter lines, several plain distractors (squares and discs, any of
the ten colours) and one checkered disc, the target, drawn last: 2-pixel
checks of its colour and of that colour lightened towards white. The label
is the target's colour (ten hues, 36 degrees apart, jittered). A model has
to find the one textured object among plain ones of the same colours and
read its colour, so the few patches the target covers (1-4 of the 64 at
patch size 8) carry the label: a reduction that drops or dilutes them
costs accuracy, and a random subset of tokens is clearly worse than one
chosen by attention.

Offline and in memory, no TFDS: example i of a split is drawn from
numpy's default_rng((split seed, i)), so every split is reproducible,
random-access and independent of batch size or thread count. 'train' is
as long as a run can use (fresh images every step, no epochs), 'validation'
and 'selection' (held out, for choosing a policy's setting) are fixed.

  source = ObjectsSource('validation')
  example = source[0]   # {'image': uint8 [64, 64, 3], 'label', 'target'}
"""

import colorsys
import concurrent.futures
import dataclasses
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

NAME = 'synthetic_objects'
NUM_CLASSES = 10
CLASS_NAMES = ('red', 'orange', 'yellow', 'lime', 'green', 'teal', 'cyan',
               'blue', 'violet', 'magenta')
MEAN = (0.5, 0.5, 0.5)     # normalisation the test bed trains with (0..1)
STD = (0.5, 0.5, 0.5)

# Split -> (seed, number of examples).
SPLITS = {'train': (0, 2**31 - 1), 'validation': (1, 2000),
          'selection': (2, 2000)}


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """What makes the target hard to find and to name (defaults: the test bed).

  Attributes:
    size: image side in pixels.
    distractors: (min, max) number of filled distractors, max exclusive.
    radius: (min, max) object radius in pixels.
    hue_jitter: standard deviation of every object's hue, in turns (the
      classes are 0.1 apart).
    noise: standard deviation of the background's pixel noise (0..1 units).
    lines: (min, max) clutter lines, max exclusive.
    contrast: how far the target's light checks move towards white (1:
      white, 0: no texture, the target looks like a distractor).
    check: the target's check size in pixels.
  """
  size: int = 64
  distractors: Tuple[int, int] = (8, 14)
  radius: Tuple[float, float] = (2.5, 4.0)
  hue_jitter: float = 0.03
  noise: float = 0.05
  lines: Tuple[int, int] = (2, 5)
  contrast: float = 0.4
  check: int = 2


def _rgb(hue: float, sat: float, val: float) -> np.ndarray:
  return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, sat, val), np.float32)


def generate(rng: np.random.Generator, difficulty: Difficulty = Difficulty()
             ) -> Tuple[np.ndarray, int, Tuple[float, float, float]]:
  """One example: (uint8 [S, S, 3] image, label, (cy, cx, r) of the
  target)."""
  d = difficulty
  s = d.size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  img = np.empty((s, s, 3), np.float32)
  img[:] = rng.uniform(0.3, 0.6, 3)
  img += rng.uniform(-0.15, 0.15, 3).astype(np.float32) * (yy / s)[..., None]
  img += rng.normal(0.0, d.noise, (s, s, 3)).astype(np.float32)
  for _ in range(rng.integers(*d.lines)):
    y0, x0, y1, x1 = rng.uniform(0, s, 4)
    dist = np.abs((y1 - y0) * (xx - x0) - (x1 - x0) * (yy - y0)) / (
        np.hypot(y1 - y0, x1 - x0) + 1e-6)
    img[dist < rng.uniform(0.5, 1.2)] = _rgb(
        rng.integers(NUM_CLASSES) / NUM_CLASSES, rng.uniform(0.3, 0.8),
        rng.uniform(0.4, 1.0))
  label = int(rng.integers(NUM_CLASSES))
  count = int(rng.integers(*d.distractors))
  where = (0.0, 0.0, 0.0)
  checks = (np.floor(yy / d.check) + np.floor(xx / d.check)) % 2 == 0
  for i in range(count + 1):
    r = rng.uniform(*d.radius)
    cy, cx = rng.uniform(r + 1, s - r - 1, 2)
    target = i == count                       # drawn last: never covered
    hue = (label if target else rng.integers(NUM_CLASSES)) / NUM_CLASSES
    colour = _rgb(hue + rng.normal(0.0, d.hue_jitter), rng.uniform(0.7, 1.0),
                  rng.uniform(0.7, 1.0))
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if target:
      disc = d2 <= r * r
      img[disc & checks] = colour
      img[disc & ~checks] = colour * (1.0 - d.contrast) + d.contrast
      where = (float(cy), float(cx), float(r))
      continue
    if rng.random() < 0.5:
      mask = (np.abs(yy - cy) <= 0.85 * r) & (np.abs(xx - cx) <= 0.85 * r)
    else:
      mask = d2 <= r * r
    img[mask] = colour
  return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8), label, where


class ObjectsSource(Sequence):
  """Random-access examples of one split: {'image', 'label', 'target'}."""

  def __init__(self, split: str, difficulty: Difficulty = Difficulty()):
    base = split.partition('[')[0]
    if base not in SPLITS:
      raise ValueError(f'{NAME} has no split {split!r}; splits: '
                       f'{sorted(SPLITS)}.')
    if base != split:
      raise ValueError(f'{NAME}: split slices ({split!r}) are not supported; '
                       'use data.num_examples to evaluate fewer images.')
    self.split = split
    self.seed, self.length = SPLITS[split]
    self.difficulty = difficulty
    self.label_names = CLASS_NAMES

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Dict[str, Any]:
    if not 0 <= index < self.length:
      raise IndexError(f'{NAME}:{self.split} index {index} out of range.')
    rng = np.random.default_rng((self.seed, int(index)))
    image, label, where = generate(rng, self.difficulty)
    return dict(image=image, label=label,
                target=np.asarray(where, np.float32))


def open_source(split: str, difficulty: Optional[Dict[str, Any]] = None
                ) -> ObjectsSource:
  """The split, with optional Difficulty overrides (a dict of its fields)."""
  fields = {f.name for f in dataclasses.fields(Difficulty)}
  bad = sorted(set(difficulty or {}) - fields)
  if bad:
    raise ValueError(f'unknown {NAME} difficulty fields {bad}; known: '
                     f'{sorted(fields)}.')
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in (difficulty or {}).items()}
  return ObjectsSource(split, Difficulty(**kwargs))


def train_batches(source: ObjectsSource, *, batch_size: int, start_step: int,
                  mean: Sequence[float], std: Sequence[float],
                  num_threads: int = 2, prefetch: int = 4,
                  process_index: int = 0, process_count: int = 1
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """Normalised training batches; batch t holds examples [t B, (t + 1) B).

  Resuming at start_step gives exactly the batches an uninterrupted run
  would have seen. With several processes each takes its rows of the
  global batch. Examples are drawn by `num_threads` threads, `prefetch`
  batches ahead.

  Yields:
    dict(image=float32 [B / processes, S, S, 3], label=int32 [...]).
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not a multiple of the '
                     f'{process_count} processes.')
  local = batch_size // process_count
  mean = np.asarray(mean, np.float32) * 255.0
  std = np.asarray(std, np.float32) * 255.0

  def make(step: int) -> Dict[str, np.ndarray]:
    first = step * batch_size + process_index * local
    examples = [source[(first + j) % len(source)] for j in range(local)]
    image = np.stack([e['image'] for e in examples]).astype(np.float32)
    return dict(image=(image - mean) / std,
                label=np.asarray([e['label'] for e in examples], np.int32))

  pool = concurrent.futures.ThreadPoolExecutor(max(num_threads, 1))
  try:
    pending = [pool.submit(make, start_step + i) for i in range(prefetch)]
    step = start_step + prefetch
    while True:
      batch = pending.pop(0).result()
      pending.append(pool.submit(make, step))
      step += 1
      yield batch
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
