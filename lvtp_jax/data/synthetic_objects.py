"""synthetic_objects: procedural classification sets where small objects
among clutter decide the label (the classification test bed,
configs/quickstart_cls.py).

Every image (64 x 64 by default) has a noisy, shaded background crossed by
thin clutter lines. Two tasks (Difficulty.chain):

- The colour task (chain=0, the Difficulty default): several plain
  distractors (squares and discs, any of the ten colours) and one
  checkered disc, the target, drawn last: 2-pixel checks of its colour and
  of that colour lightened towards white. The label is the target's colour
  (ten hues, 36 degrees apart, jittered). The target's patches identify it
  linearly, so a ViT reads the label in its first attention layer and no
  later token reduction changes the answer (docs/quickstart_cls.md).
- The lookup task (chain=D >= 1; the test bed uses D=1): key-value cards,
  one grid cell (one patch) each, a frame in the key's colour around a
  centre in the value's colour, keys all different, and one checkered
  square, the marker. The label is reached by walking from the marker's
  colour D times to the value of the card whose key has the colour in hand.
  The answer needs D + 1 rounds of attention (the marker's colour, then
  each card on the path), so the cards on the path must survive the
  blocks in which a model looks them up: dropping or merging the wrong
  tokens costs accuracy.

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
    chain: 0 (the default): the label is the checkered target's colour.
      D >= 1: the lookup task. The image holds key-value cards (one grid
      cell each: a frame in the key's colour around a centre square in
      the value's colour) and one checkered square, the marker; keys are
      distinct colours. Start at the marker's colour, find the card whose
      frame has that colour, move to its centre's colour, D times: the
      label is the colour reached. Nothing in one cell tells the label, so
      a model needs about D + 1 rounds of attention to know it, and the
      cards on the path must survive until it does.
    pairs: (min, max) cards of the lookup task (max exclusive; at least
      `chain`, at most 10: the keys are distinct colours).
    cell: the lookup task's grid cell in pixels (the patch size, so that a
      card is one token).
  """
  size: int = 64
  distractors: Tuple[int, int] = (8, 14)
  radius: Tuple[float, float] = (2.5, 4.0)
  hue_jitter: float = 0.03
  noise: float = 0.05
  lines: Tuple[int, int] = (2, 5)
  contrast: float = 0.4
  check: int = 2
  chain: int = 0
  pairs: Tuple[int, int] = (5, 8)
  cell: int = 8

  def __post_init__(self):
    if self.chain < 0:
      raise ValueError(f'chain={self.chain}: 0 (the colour task) or the '
                       'number of lookups (>= 1).')
    if self.chain:
      lo, hi = self.pairs
      if not self.chain <= lo < hi <= NUM_CLASSES + 1:
        raise ValueError(
            f'pairs={self.pairs}: need chain ({self.chain}) <= min < max '
            f'<= {NUM_CLASSES + 1} (keys are distinct colours).')
      if self.size % self.cell or self.cell < 8:
        raise ValueError(f'cell={self.cell}: a divisor of size '
                         f'({self.size}), at least 8 pixels.')
      if hi > (self.size // self.cell) ** 2 // 2:
        raise ValueError(f'pairs={self.pairs}: too many pairs for a '
                         f'{self.size // self.cell}-cell grid.')


def _rgb(hue: float, sat: float, val: float) -> np.ndarray:
  return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, sat, val), np.float32)


def generate(rng: np.random.Generator, difficulty: Difficulty = Difficulty()
             ) -> Tuple[np.ndarray, int, Tuple[float, float, float]]:
  """One example: (uint8 [S, S, 3] image, label, (cy, cx, r) of the
  target: the checkered disc, or for the lookup task the centre of the
  card the walk ends on)."""
  d = difficulty
  s = d.size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  img = _background(rng, d, yy, xx)
  if d.chain:
    return _lookup(rng, d, img)
  label = int(rng.integers(NUM_CLASSES))
  count = int(rng.integers(*d.distractors))
  where = (0.0, 0.0, 0.0)
  checks = (np.floor(yy / d.check) + np.floor(xx / d.check)) % 2 == 0
  for i in range(count + 1):
    r = rng.uniform(*d.radius)
    cy, cx = rng.uniform(r + 1, s - r - 1, 2)
    target = i == count                       # drawn last: never covered
    colour = _colour(rng, d, label if target else rng.integers(NUM_CLASSES))
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if target:
      _checkered(img, d2 <= r * r, checks, colour, d.contrast)
      where = (float(cy), float(cx), float(r))
      continue
    if rng.random() < 0.5:
      mask = (np.abs(yy - cy) <= 0.85 * r) & (np.abs(xx - cx) <= 0.85 * r)
    else:
      mask = d2 <= r * r
    img[mask] = colour
  return _to_uint8(img), label, where


def _checkered(img: np.ndarray, mask: np.ndarray, checks: np.ndarray,
               colour: np.ndarray, contrast: float) -> None:
  """Paints mask in checks of colour and of colour lightened by contrast
  towards white (the colour task's target, the lookup task's marker)."""
  img[mask & checks] = colour
  img[mask & ~checks] = colour * (1.0 - contrast) + contrast


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _background(rng: np.random.Generator, d: Difficulty, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
  """A noisy, shaded background crossed by thin clutter lines."""
  s = d.size
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
  return img


def _colour(rng: np.random.Generator, d: Difficulty, cls) -> np.ndarray:
  """An object colour of class `cls` (jittered hue, bright)."""
  return _rgb(cls / NUM_CLASSES + rng.normal(0.0, d.hue_jitter),
              rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))


def lookup_layout(rng: np.random.Generator, d: Difficulty) -> Dict[str, Any]:
  """The lookup task's objects: where they go and their classes.

  Returns:
    dict(marker=(row, col, class), pairs=[(row, col, key, value), ...]
    with the card (key frame, value centre) in grid cell (row, col),
    path=[(row, col) of each card the walk visits], label).
  """
  g = d.size // d.cell
  walk = rng.permutation(NUM_CLASSES)[:d.chain + 1]   # distinct: no loops
  count = int(rng.integers(*d.pairs))
  # The other keys: colours that are no key on the walk. The walk's last
  # colour may be one (the walk could go on: a model must count steps).
  other = rng.permutation(np.setdiff1d(np.arange(NUM_CLASSES), walk[:-1]))
  other = other[:count - d.chain]
  keys = [int(k) for k in walk[:-1]] + [int(k) for k in other]
  values = [int(v) for v in walk[1:]] + [
      int((k + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES) for k in other]
  cells = rng.permutation(g * g)[:count + 1]       # the cards, the marker
  spots = [(int(i) // g, int(i) % g) for i in cells]
  # Pair i goes to spot order[i]. (The cells are already in random order,
  # so this draw adds nothing; it stays so that the images, and the
  # numbers measured on them, stay the same.)
  order = rng.permutation(count)
  pairs = [(*spots[order[i]], keys[i], values[i]) for i in range(count)]
  return dict(marker=(*spots[-1], int(walk[0])), pairs=pairs,
              path=[spots[order[i]] for i in range(d.chain)],
              label=int(walk[-1]))


def _lookup(rng: np.random.Generator, d: Difficulty, img: np.ndarray):
  """The lookup task (Difficulty.chain >= 1) drawn on a background."""
  layout = lookup_layout(rng, d)
  c = d.cell
  b = c // 4                                 # the frame's width
  yc, xc = np.mgrid[0:c, 0:c]
  frame = (np.minimum(np.minimum(yc, xc), np.minimum(c - 1 - yc, c - 1 - xc))
           < b)
  centre = ~frame
  square = np.zeros((c, c), bool)
  square[1:c - 1, 1:c - 1] = True
  checks = (yc // d.check + xc // d.check) % 2 == 0
  for r, col, key, value in layout['pairs']:
    cell = img[r * c:(r + 1) * c, col * c:(col + 1) * c]
    cell[frame] = _colour(rng, d, key)
    cell[centre] = _colour(rng, d, value)
  r, col, cls = layout['marker']
  colour = _colour(rng, d, cls)
  _checkered(img[r * c:(r + 1) * c, col * c:(col + 1) * c], square, checks,
             colour, d.contrast)
  r, col = layout['path'][-1]
  where = ((r + 0.5) * c, (col + 0.5) * c, c / 2.0 - b)
  return _to_uint8(img), layout['label'], where


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
