"""Procedural segmentation scenes for the token-pruning benchmark (pure NumPy).

Every image is a small outdoor-like scene: large "stuff" regions (sky, grass,
water, road, wall), each with its own texture, under smooth illumination,
with "thing" objects painted on top in random order so that they occlude each
other (disks, poles, wires, blobs, triangles). The layout is made for token
pruning: with 16x16 patches most tokens lie inside one large, clearly
textured region ("easy", a pruning method should let them exit early), and a
minority straddle a boundary or hold a small or thin object ("hard", they
need the full network). `hard_patch_fraction` measures that minority.

The class is not readable from one pixel's colour: things take random
colours, stuff colours are jittered and sometimes borrowed from another stuff
class, and sky / water and road / wall share colour ranges, so the model has
to look at texture and context.

`difficulty` (default 1.0, any float >= 0) scales the number of small and
thin objects, the pixel noise, the blur and the colour overlap between stuff
classes. 0 gives clean scenes with only large objects; 2 or 3 gives a harder
benchmark. The layout of the large regions does not depend on it.

Generation is deterministic: example `index` of `split` is drawn from
`numpy.random.default_rng([SPLIT_IDS[split], index])` alone, so it does not
depend on which examples were generated before. The output is byte-identical
on one platform; across CPUs, libm differences in sin / exp could in rare
cases move a uint8 value by one.
"""

import colorsys
from typing import Callable, Dict, Tuple

import numpy as np
from scipy import ndimage

CLASS_NAMES = ('sky', 'grass', 'water', 'road', 'wall',
               'disk', 'pole', 'wire', 'blob', 'triangle')
NUM_CLASSES = len(CLASS_NAMES)
SKY, GRASS, WATER, ROAD, WALL, DISK, POLE, WIRE, BLOB, TRIANGLE = range(
    NUM_CLASSES)
STUFF_CLASSES = (SKY, GRASS, WATER, ROAD, WALL)
THING_CLASSES = (DISK, POLE, WIRE, BLOB, TRIANGLE)

# Label value for "ignore" in the segmentation convention of the project. The
# generator labels every pixel, so it never emits this value.
IGNORE_INDEX = 255

# Colours for label maps (visualisation only; image colours are random).
PALETTE = np.array([
    (135, 190, 235),  # sky
    (60, 160, 60),    # grass
    (30, 80, 180),    # water
    (110, 110, 110),  # road
    (180, 90, 60),    # wall
    (240, 200, 40),   # disk
    (230, 30, 200),   # pole
    (250, 250, 250),  # wire
    (150, 60, 200),   # blob
    (240, 120, 20),   # triangle
], dtype=np.uint8)

SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2, 'selection': 3}
DEFAULT_SIZE = 128
DEFAULT_DIFFICULTY = 1.0

# Base (hue, saturation, value) of each stuff class. Sky and water, and road
# and wall, are close on purpose: texture has to tell them apart.
_STUFF_HSV = {
    SKY: (0.58, 0.40, 0.85),
    GRASS: (0.27, 0.55, 0.55),
    WATER: (0.56, 0.55, 0.60),
    ROAD: (0.08, 0.10, 0.45),
    WALL: (0.05, 0.35, 0.55),
}


class _Canvas:
  """Image, label map and random state of one scene under construction.

  Attributes:
    rng: the example's generator; every random draw goes through it.
    size: side S of the square image in pixels.
    difficulty: the difficulty knob (>= 0).
    plain_shapes: disks, blobs and triangles are filled with their flat
      colour (no shading, spots or stripes), so only their outline tells
      them apart.
    yy, xx: float64 [S, S] pixel-centre coordinates (row, column).
    image: float64 [S, S, 3] RGB, nominally in [0, 1].
    label: uint8 [S, S] class ids.
  """

  def __init__(self, rng: np.random.Generator, size: int, difficulty: float,
               plain_shapes: bool = False):
    self.rng = rng
    self.size = size
    self.difficulty = difficulty
    self.plain_shapes = plain_shapes
    self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    self.image = np.zeros((size, size, 3))
    self.label = np.zeros((size, size), np.uint8)
    self.path_steps = None   # 'paths' scenes: steps from the marker per cell

  def paint(self, mask: np.ndarray, texture: np.ndarray, class_id: int):
    """Paints `texture` [S, S, 3] and `class_id` where mask [S, S] is True."""
    np.copyto(self.image, texture, where=mask[..., None])
    self.label[mask] = class_id


# ----------------------------------------------------------------------------
# Random fields and colours.
# ----------------------------------------------------------------------------


def _smooth_field(c: _Canvas, cells: int) -> np.ndarray:
  """Smooth random field [S, S] with unit std and ~`cells` bumps a side.

  Normal samples on a cells x cells grid, spread by separable Gaussian
  bumps: field = B @ coarse @ B.T with B [S, cells]. This is a few small
  matrix products, much cheaper than spline interpolation.
  """
  coarse = c.rng.standard_normal((cells, cells))
  spacing = c.size / (cells - 1)
  centres = np.arange(cells) * spacing
  bumps = np.exp(-0.5 * ((c.yy[:, :1] - centres) / (0.6 * spacing)) ** 2)
  field = bumps @ coarse @ bumps.T
  return field / field.std()


def _grain(c: _Canvas, sigma: Tuple[float, float]) -> np.ndarray:
  """White noise blurred by `sigma` (rows, columns), rescaled to unit std."""
  noise = ndimage.gaussian_filter(
      c.rng.standard_normal((c.size, c.size)), sigma)
  return noise / noise.std()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  """RGB float [3] of a colour given in HSV (hue wraps, s and v clipped)."""
  return np.array(colorsys.hsv_to_rgb(
      h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _stuff_colour(c: _Canvas, class_id: int) -> np.ndarray:
  """Jittered base colour [3] of a stuff class.

  With probability 0.15 * difficulty the colour of another stuff class is
  used, and the jitter grows with difficulty: both make colours of different
  classes overlap.
  """
  if c.rng.random() < 0.15 * c.difficulty:
    class_id = STUFF_CLASSES[c.rng.integers(len(STUFF_CLASSES))]
  h, s, v = _STUFF_HSV[class_id]
  jitter = 0.5 + 0.5 * c.difficulty
  return _hsv(h + 0.04 * jitter * c.rng.uniform(-1, 1),
              s + 0.15 * jitter * c.rng.uniform(-1, 1),
              v + 0.15 * jitter * c.rng.uniform(-1, 1))


def _thing_colour(c: _Canvas) -> np.ndarray:
  """Any hue, moderately saturated: things are recognised by shape."""
  return _hsv(c.rng.random(), c.rng.uniform(0.2, 0.9), c.rng.uniform(0.3, 0.95))


# ----------------------------------------------------------------------------
# Stuff textures: [S, S, 3] images over the whole canvas, masked when painted.
# ----------------------------------------------------------------------------


def _sky_texture(c: _Canvas) -> np.ndarray:
  # Smooth: a vertical gradient and faint low-frequency clouds.
  gradient = 1.1 - 0.25 * c.yy / c.size
  clouds = 0.06 * _smooth_field(c, 4)
  return _stuff_colour(c, SKY) * (gradient + clouds)[..., None]


def _grass_texture(c: _Canvas) -> np.ndarray:
  # High-frequency noise stretched vertically (blades).
  blades = _grain(c, (1.5, 0.4))
  return _stuff_colour(c, GRASS) * (1 + 0.22 * blades)[..., None]


def _water_texture(c: _Canvas) -> np.ndarray:
  # Horizontal waves whose phase meanders slowly along the row.
  period = c.rng.uniform(4, 8)
  phase = 1.5 * _smooth_field(c, 3)
  waves = np.sin(2 * np.pi * c.yy / period + phase)
  return _stuff_colour(c, WATER) * (1 + 0.18 * waves)[..., None]


def _road_texture(c: _Canvas) -> np.ndarray:
  # Fine isotropic grain on a dull colour.
  grain = _grain(c, (0.6, 0.6))
  return _stuff_colour(c, ROAD) * (1 + 0.15 * grain)[..., None]


def _wall_texture(c: _Canvas) -> np.ndarray:
  """Bricks: staggered rows, per-brick shade, lighter mortar lines."""
  height = c.rng.integers(5, 10)
  width = 2 * height
  row = np.floor(c.yy / height).astype(int)
  x = c.xx + (row % 2) * width / 2
  col = np.floor(x / width).astype(int)
  shades = c.rng.uniform(0.8, 1.1, (64, 64))
  shade = shades[row % 64, col % 64]
  mortar = (c.yy % height < 1) | (x % width < 1)
  shade = np.where(mortar, 1.35, shade)
  return _stuff_colour(c, WALL) * shade[..., None]


# ----------------------------------------------------------------------------
# Stuff layout: sky above a wavy horizon, ground regions, a road, walls.
# ----------------------------------------------------------------------------


def _horizon(c: _Canvas) -> np.ndarray:
  """Row [S, S] of a gently tilted, gently waving horizon for every pixel."""
  base = c.size * c.rng.uniform(0.25, 0.5)
  tilt = c.rng.uniform(-0.15, 0.15) * (c.xx - c.size / 2)
  wave = c.rng.uniform(0, 4) * np.sin(
      2 * np.pi * c.xx / c.rng.uniform(40, 120) + c.rng.uniform(0, 2 * np.pi))
  return base + tilt + wave


def _paint_ground(c: _Canvas, ground: np.ndarray):
  """Splits the `ground` mask [S, S] among 1-2 of grass / water / road.

  The regions are the argmax of smooth random fields, which gives large
  regions with organic boundaries.
  """
  textures = {GRASS: _grass_texture, WATER: _water_texture,
              ROAD: _road_texture}
  count = 1 + int(c.rng.random() < 0.5)
  classes = c.rng.choice(list(textures), size=count, replace=False)
  fields = np.stack([_smooth_field(c, 3) for _ in classes])
  owner = np.argmax(fields, axis=0)
  for k, class_id in enumerate(classes):
    c.paint(ground & (owner == k), textures[class_id](c), class_id)


def _paint_road(c: _Canvas, horizon: np.ndarray):
  """A road in perspective: a trapezoid from the image bottom to the horizon."""
  top_x = c.size * c.rng.uniform(0.3, 0.7)
  half_top = c.rng.uniform(1, 6)
  half_bottom = c.size * c.rng.uniform(0.2, 0.45)
  top_y = horizon[0, int(top_x)]
  t = np.clip((c.yy - top_y) / (c.size - top_y), 0, 1)
  centre = top_x + t * c.rng.uniform(-0.3, 0.3) * c.size
  half = half_top + t * (half_bottom - half_top)
  mask = (c.yy > top_y) & (np.abs(c.xx - centre) < half)
  c.paint(mask, _road_texture(c), ROAD)


def _paint_wall(c: _Canvas, horizon: np.ndarray):
  """A building front: an axis-aligned rectangle standing on the ground."""
  width = c.size * c.rng.uniform(0.25, 0.6)
  left = c.rng.choice([-width / 2, c.rng.uniform(0, c.size - width),
                       c.size - width / 2])
  top = c.size * c.rng.uniform(0.0, 0.25)
  bottom = horizon.mean() + c.size * c.rng.uniform(0.05, 0.2)
  mask = ((c.xx > left) & (c.xx < left + width) &
          (c.yy > top) & (c.yy < bottom))
  c.paint(mask, _wall_texture(c), WALL)


def _paint_stuff(c: _Canvas):
  """Sky (usually), ground regions, and sometimes a road and walls."""
  if c.rng.random() < 0.8:
    horizon = _horizon(c)
  else:  # Looking down: no sky, the ground fills the image.
    horizon = np.full((c.size, c.size), -1.0)
  c.paint(c.yy < horizon, _sky_texture(c), SKY)
  _paint_ground(c, c.yy >= horizon)
  if c.rng.random() < 0.3:
    _paint_road(c, np.maximum(horizon, 0))
  if c.rng.random() < 0.35:
    _paint_wall(c, np.maximum(horizon, c.size * 0.3))


# ----------------------------------------------------------------------------
# Things: shapes (masks) and their textures.
# ----------------------------------------------------------------------------


def _random_centre(c: _Canvas) -> Tuple[float, float]:
  return c.rng.uniform(0, c.size), c.rng.uniform(0, c.size)


def _paint_disk(c: _Canvas, radius: float):
  """An ellipse shaded like a lit sphere."""
  cy, cx = _random_centre(c)
  a = radius
  b = radius * c.rng.uniform(0.6, 1.0)
  angle = c.rng.uniform(0, np.pi)
  u = (c.xx - cx) * np.cos(angle) + (c.yy - cy) * np.sin(angle)
  v = (c.yy - cy) * np.cos(angle) - (c.xx - cx) * np.sin(angle)
  r2 = (u / max(a, 1.0)) ** 2 + (v / max(b, 1.0)) ** 2
  shade = 1.15 - 0.45 * np.clip(r2, 0, 1)
  if c.plain_shapes:
    shade = np.ones_like(shade)
  c.paint(r2 <= 1, _thing_colour(c) * shade[..., None], DISK)


def _paint_blob(c: _Canvas, radius: float):
  """A star-shaped blob with a wobbly outline and a mottled surface."""
  cy, cx = _random_centre(c)
  phi = np.arctan2(c.yy - cy, c.xx - cx)
  outline = np.ones_like(phi)
  for k in (2, 3, 5):
    outline += c.rng.uniform(0, 0.2) * np.sin(k * phi + c.rng.uniform(0, 6.3))
  mask = np.hypot(c.yy - cy, c.xx - cx) <= max(radius, 1.0) * outline
  spots = 1 + 0.3 * (_smooth_field(c, 12) > 0.3)
  if c.plain_shapes:
    spots = np.ones_like(spots)
  c.paint(mask, _thing_colour(c) * spots[..., None], BLOB)


def _paint_triangle(c: _Canvas, radius: float):
  """A triangle inscribed in a circle of `radius`, with diagonal stripes."""
  cy, cx = _random_centre(c)
  angles = (c.rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 +
            c.rng.uniform(-0.4, 0.4, 3))
  radius = max(radius, 1.5)
  py, px = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
  # Inside when the pixel is on the same side of all three edges.
  sides = [(px[j] - px[i]) * (c.yy - py[i]) - (py[j] - py[i]) * (c.xx - px[i])
           for i, j in ((0, 1), (1, 2), (2, 0))]
  mask = ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
      (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))
  period = c.rng.uniform(3, 6)
  stripes = 1 + 0.25 * np.sign(np.sin(2 * np.pi * (c.xx + c.yy) / period))
  if c.plain_shapes:
    stripes = np.ones_like(stripes)
  c.paint(mask, _thing_colour(c) * stripes[..., None], TRIANGLE)


def _paint_pole(c: _Canvas):
  """A 1-3 px wide, nearly vertical segment: distance to the segment <= w/2.

  A width of 1 still gives at least one pixel per row, because the nearest
  pixel centre of a row is at most 0.5 px from the axis.
  """
  width = c.rng.integers(1, 4)
  length = c.size * c.rng.uniform(0.15, 0.6)
  by, bx = c.rng.uniform(0.4, 1.1) * c.size, c.rng.uniform(0, c.size)
  ty, tx = by - length, bx + c.rng.uniform(-0.15, 0.15) * length
  dy, dx = ty - by, tx - bx
  t = np.clip(((c.yy - by) * dy + (c.xx - bx) * dx) / (dy * dy + dx * dx), 0, 1)
  dist = np.hypot(c.yy - by - t * dy, c.xx - bx - t * dx)
  grey = _hsv(c.rng.random(), c.rng.uniform(0, 0.3), c.rng.uniform(0.1, 0.7))
  c.paint(dist <= width / 2, np.broadcast_to(grey, c.image.shape), POLE)


def _paint_wire(c: _Canvas):
  """A sagging 1-2 px wire, y = f(x) for x in [x0, x1] with |f'| <= ~1.

  The mask is |y - f(x)| / sqrt(1 + f'(x)^2) <= w/2 (distance to the curve to
  first order); with a gentle slope every column in range gets a pixel.
  """
  width = c.rng.integers(1, 3)
  span = c.size * c.rng.uniform(0.25, 1.0)
  x0 = c.rng.uniform(-0.2 * c.size, c.size - 0.5 * span)
  y0, y1 = c.rng.uniform(0.05, 0.7, 2) * c.size
  sag = c.rng.uniform(0, 0.1) * span
  t = (c.xx - x0) / span
  y = y0 + t * (y1 - y0) + 4 * sag * t * (1 - t)
  slope = ((y1 - y0) + 4 * sag * (1 - 2 * t)) / span
  dist = np.abs(c.yy - y) / np.sqrt(1 + slope ** 2)
  mask = (dist <= width / 2) & (t >= 0) & (t <= 1)
  dark = _hsv(c.rng.random(), c.rng.uniform(0, 0.5), c.rng.uniform(0.02, 0.35))
  c.paint(mask, np.broadcast_to(dark, c.image.shape), WIRE)


_SHAPES: Dict[int, Callable[[_Canvas, float], None]] = {
    DISK: _paint_disk, BLOB: _paint_blob, TRIANGLE: _paint_triangle}


def _thing_plan(c: _Canvas) -> list:
  """Painters for the scene's things, in painting (occlusion) order.

  Large shapes (radius 8-24 px) do not depend on difficulty; small shapes
  (radius 1-6 px: a few pixels up to about a patch), poles and wires scale
  with it.
  """
  d = c.difficulty
  plan = []
  # Plain shapes: 1-3 large ones of radius 12-32 px (up to 8 patches of 8
  # px across), so that most of a shape's patches see only its flat fill.
  lo, hi, r_lo, r_hi = (1, 4, 12, 32) if c.plain_shapes else (0, 3, 8, 24)
  for _ in range(c.rng.integers(lo, hi)):
    radius = c.rng.uniform(r_lo, r_hi)
    plan.append((_SHAPES[c.rng.choice(list(_SHAPES))], radius))
  for _ in range(c.rng.poisson(1.2 * d)):
    radius = np.exp(c.rng.uniform(np.log(1.0), np.log(6.0)))
    plan.append((_SHAPES[c.rng.choice(list(_SHAPES))], radius))
  plan += [(_paint_pole, None)] * c.rng.poisson(0.6 * d)
  plan += [(_paint_wire, None)] * c.rng.poisson(0.35 * d)
  return [plan[i] for i in c.rng.permutation(len(plan))]


def _paint_things(c: _Canvas):
  for painter, radius in _thing_plan(c):
    if radius is None:
      painter(c)
    else:
      painter(c, radius)


# Snakes: the label of a tube is the colour of the marker at its far end.

# Marker hue of each thing class on a snake ('snakes' scenes): saturated and
# bright, away from the stuff colours; the tubes themselves are all one grey.
SNAKE_HUES = {DISK: 0.0, POLE: 0.15, WIRE: 0.33, BLOB: 0.62, TRIANGLE: 0.8}


def _snake_path(c: _Canvas, length: float) -> np.ndarray:
  """Points [n, 2] (row, column) of a smooth random walk, 1 px apart.

  The heading turns a little at every step (a random drift that itself
  drifts), and reflects off a margin of 6 px from the border.
  """
  lo, hi = 6.0, c.size - 6.0
  pos = c.rng.uniform(lo + 8, hi - 8, 2)
  heading = c.rng.uniform(0, 2 * np.pi)
  turn = 0.0
  points = [pos.copy()]
  step = lambda: np.array([np.sin(heading), np.cos(heading)])
  for _ in range(int(length)):
    turn = 0.95 * turn + c.rng.normal(0, 0.01)
    heading += turn
    nxt = pos + step()
    if not lo <= nxt[0] <= hi:   # Flips the row component.
      heading = -heading
    if not lo <= nxt[1] <= hi:   # Flips the column component.
      heading = np.pi - heading
    pos = np.clip(pos + step(), lo, hi)
    points.append(pos)
  return np.array(points)


def _paint_snakes(c: _Canvas):
  """3-5 grey tubes (6-8 px wide, 60-160 px long) that do not touch.

  Every tube has a coloured marker (radius 5-6 px) at its head; the tube's
  pixels and its marker take the class whose hue (SNAKE_HUES) the marker
  has. The tubes are the same grey, so a tube patch far from its head has to
  follow its own tube back to the marker, patch by patch: the context a
  token needs is far away and reached only through other tokens of the
  tube, which is what deeper blocks add.
  """
  texture = _tube_texture(c, (0.35, 0.75))
  taken = np.zeros((c.size, c.size), bool)
  for _ in range(c.rng.integers(3, 6)):
    for _ in range(20):  # Tries to place a tube clear of the others.
      points = _snake_path(c, c.rng.uniform(60, 160))
      line = np.ones((c.size, c.size), bool)
      idx = np.clip(np.round(points - 0.5).astype(int), 0, c.size - 1)
      line[idx[:, 0], idx[:, 1]] = False
      dist = ndimage.distance_transform_edt(line)
      width = c.rng.uniform(6, 8)
      radius = c.rng.uniform(5, 6)
      head = np.hypot(c.yy - points[0, 0], c.xx - points[0, 1]) <= radius
      tube = (dist <= width / 2) | head
      if not (taken & (dist <= width / 2 + 6)).any():
        break
    else:
      continue
    taken |= tube
    _paint_tube(c, tube, head, texture)


def _tube_texture(c: _Canvas, value: Tuple[float, float]) -> np.ndarray:
  """The one grey [S, S, 3] all tubes of a scene share (brightness drawn
  from `value`), with a faint grain."""
  grey = _hsv(c.rng.random(), c.rng.uniform(0.0, 0.08),
              c.rng.uniform(*value))
  return grey * (1 + 0.04 * _grain(c, (1.0, 1.0)))[..., None]


def _paint_tube(c: _Canvas, tube: np.ndarray, head: np.ndarray,
                texture: np.ndarray):
  """Paints a tube (its head included) in `texture` with a random thing
  class, then its head in that class's saturated marker hue."""
  class_id = THING_CLASSES[c.rng.integers(len(THING_CLASSES))]
  c.paint(tube, texture, class_id)
  colour = _hsv(SNAKE_HUES[class_id] + c.rng.uniform(-0.03, 0.03),
                c.rng.uniform(0.75, 1.0), c.rng.uniform(0.8, 1.0))
  np.copyto(c.image, np.broadcast_to(colour, c.image.shape),
            where=head[..., None])


# Paths: tubes that run along the patch grid, so that a tube token's only
# link to its marker is a chain of neighbouring tube tokens.

PATH_CELL = 8   # Grid step of the paths in pixels (the test bed's patch size).

# How many tubes a 'paths' scene tries to place, and how many cells each
# has (inclusive ranges). 'long' is the 'paths' config; 'short' is
# 'paths_short', the first stage of a curriculum: many short tubes, so
# that almost every tube patch is 1-4 steps from its marker and, with
# every class's marker in most images, guessing among the markers present
# no longer pays. 'dense' is 'short' with 20-30 tubes: about a third of
# the cells are tube cells (twice 'short'), so twice the patches whose
# label needs a neighbour, and every class's marker several times per image.
PATH_LAYOUTS = {'long': dict(count=(3, 6), cells=(5, 18)),
                'short': dict(count=(8, 14), cells=(2, 5)),
                'dense': dict(count=(20, 30), cells=(2, 5))}


def _grid_path(c: _Canvas, blocked: np.ndarray, length: int) -> list:
  """A self-avoiding walk of up to `length` cells on the cell grid.

  Starts on a free cell, goes straight with probability 0.6 and otherwise
  turns left or right; never enters a `blocked` cell (other paths and their
  surroundings) and never touches itself: a new cell's 8-neighbours on the
  path may only be the current cell and the one before it. Stops early
  where no step is allowed.
  """
  n = blocked.shape[0]
  free = np.argwhere(~blocked)
  if not len(free):
    return []
  cells = [tuple(free[c.rng.integers(len(free))])]
  heading = c.rng.integers(4)
  moves = ((0, 1), (1, 0), (0, -1), (-1, 0))
  on_path = {cells[0]}
  while len(cells) < length:
    turn = c.rng.choice((1, -1))
    order = [heading, heading + turn, heading - turn]
    if c.rng.random() >= 0.6:   # Turns first, straight on as a fallback.
      order = order[1:] + order[:1]
    for h in order:
      dy, dx = moves[h % 4]
      y, x = cells[-1][0] + dy, cells[-1][1] + dx
      if not (0 <= y < n and 0 <= x < n) or blocked[y, x]:
        continue
      touching = {(y + a, x + b) for a in (-1, 0, 1) for b in (-1, 0, 1)
                  } & on_path
      if touching <= set(cells[-2:]):
        heading = h % 4
        cells.append((y, x))
        on_path.add((y, x))
        break
    else:
      break
  return cells


def _paint_paths(c: _Canvas, layout: str = 'long'):
  """Grey tubes along the patch grid, each with a marker at its head.

  With the 'long' layout (PATH_LAYOUTS), 3-6 tubes, each a self-avoiding
  walk of 5-18 cells of PATH_CELL px
  (`_grid_path`), drawn as a stroke 5-7 px wide through the cell centres;
  tubes keep at least one free cell (diagonals included) between each
  other. The head cell holds a saturated marker (a disk of radius 3.5 px)
  and the whole tube takes the class whose hue (SNAKE_HUES) the marker has.
  All tubes share one grey, so a tube cell k steps from its head learns its
  class only through the k - 1 tube cells between them: with one patch per
  cell, a chain of k tokens. Unlike the free-form snakes, the chain is
  unambiguous at the patch level (each tube token's tube neighbours are
  exactly its two path neighbours).
  """
  if layout not in PATH_LAYOUTS:
    raise ValueError(f'path layout {layout!r}; expected one of '
                     f'{sorted(PATH_LAYOUTS)}.')
  count, (shortest, longest) = (PATH_LAYOUTS[layout]['count'],
                                PATH_LAYOUTS[layout]['cells'])
  n = c.size // PATH_CELL
  blocked = np.zeros((n, n), bool)
  c.path_steps = np.full((n, n), -1, np.int32)
  texture = _tube_texture(c, (0.6, 0.85))
  for _ in range(c.rng.integers(count[0], count[1] + 1)):
    cells = []
    for _ in range(10):   # Tries to fit a path of at least `shortest` cells.
      cells = _grid_path(c, blocked,
                         int(c.rng.integers(shortest, longest + 1)))
      if len(cells) >= shortest:
        break
    if len(cells) < shortest:
      continue
    half = c.rng.uniform(2.5, 3.5)
    centres = (np.array(cells, np.float64) + 0.5) * PATH_CELL
    tube = np.zeros((c.size, c.size), bool)
    for a, b in zip(centres, np.concatenate([centres[:1], centres[:-1]])):
      lo, hi = np.minimum(a, b) - half, np.maximum(a, b) + half
      tube |= ((c.yy >= lo[0]) & (c.yy <= hi[0]) &
               (c.xx >= lo[1]) & (c.xx <= hi[1]))
    head = np.hypot(c.yy - centres[0, 0], c.xx - centres[0, 1]) <= 3.5
    for k, (y, x) in enumerate(cells):
      blocked[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = True
      c.path_steps[y, x] = k
    _paint_tube(c, tube | head, head, texture)


# ----------------------------------------------------------------------------
# Photometric effects and the public API.
# ----------------------------------------------------------------------------


def _photometric(c: _Canvas) -> np.ndarray:
  """Illumination, blur and noise; returns the uint8 image [S, S, 3].

  Illumination is a smooth gain over the whole image (a linear ramp plus a
  low-frequency field), so that a class's colour drifts across the image and
  across class boundaries. Blur and noise grow with difficulty.
  """
  ramp = c.rng.uniform(-0.25, 0.25, 2) @ np.stack([c.yy, c.xx]).reshape(2, -1)
  gain = 1 + ramp.reshape(c.size, c.size) / c.size + 0.08 * _smooth_field(c, 3)
  image = c.image * gain[..., None]
  blur = c.rng.uniform(0, 0.8 * c.difficulty)
  if blur > 0.2:  # Smaller sigmas barely change anything.
    image = ndimage.gaussian_filter(image, (blur, blur, 0))
  noise = 0.025 * c.difficulty * c.rng.standard_normal(image.shape)
  return np.clip(np.round((image + noise) * 255), 0, 255).astype(np.uint8)


def generate_example(
    split: str, index: int, *, size: int = DEFAULT_SIZE,
    difficulty: float = DEFAULT_DIFFICULTY,
    plain_shapes: bool = False,
    snakes: bool = False,
    paths: bool = False,
    path_layout: str = 'long') -> Tuple[np.ndarray, np.ndarray]:
  """Generates example `index` of `split` (deterministic, independent).

  Args:
    split: 'train', 'validation', 'test' or 'selection'.
    index: example index >= 0.
    size: side S of the square image in pixels.
    difficulty: >= 0; scales small / thin objects, noise, blur and colour
      overlap (see the module docstring).
    plain_shapes: disks, blobs and triangles in flat colours and larger
      (radius 12-32 px, 1-3 per image): their class is in their outline
      only, far from most of their patches (the 'shapes' config).
    snakes: instead of the things, 3-5 grey tubes whose class is the
      colour of a marker at one end (`_paint_snakes`; the 'snakes' config).
    paths: instead of the things, 3-6 grey tubes along the 8-px grid whose
      class is the colour of a marker at one end (`_paint_paths`; the
      'paths' config). At most one of snakes and paths.
    path_layout: with paths, a key of PATH_LAYOUTS: 'long' (the 'paths'
      config), 'short' (8-14 tubes of 2-5 cells; 'paths_short') or
      'dense' (20-30 tubes of 2-5 cells, as many as fit; 'paths_dense').

  Returns:
    image: uint8 [S, S, 3] RGB.
    label: uint8 [S, S] class ids in [0, NUM_CLASSES); never IGNORE_INDEX.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f'unknown split {split!r}; expected one of '
                     f'{sorted(SPLIT_IDS)}.')
  if index < 0 or size < 16 or difficulty < 0:
    raise ValueError(f'need index >= 0, size >= 16 and difficulty >= 0, got '
                     f'index={index}, size={size}, difficulty={difficulty}.')
  if snakes and paths:
    raise ValueError('generate_example: snakes and paths are two scene '
                     'sets; ask for one of them.')
  canvas = _scene(split, index, size, difficulty, plain_shapes, snakes, paths,
                  path_layout)
  return _photometric(canvas), canvas.label


def _scene(split: str, index: int, size: int, difficulty: float,
           plain_shapes: bool, snakes: bool, paths: bool,
           path_layout: str = 'long') -> _Canvas:
  """The painted canvas of an example, before the photometric effects."""
  rng = np.random.default_rng([SPLIT_IDS[split], index])
  canvas = _Canvas(rng, size, float(difficulty), plain_shapes)
  _paint_stuff(canvas)
  if snakes:
    _paint_snakes(canvas)
  elif paths:
    _paint_paths(canvas, path_layout)
  else:
    _paint_things(canvas)
  return canvas


def path_steps(split: str, index: int, *, size: int = DEFAULT_SIZE,
               difficulty: float = DEFAULT_DIFFICULTY,
               path_layout: str = 'long') -> np.ndarray:
  """Chain steps of a 'paths' example (`generate_example(..., paths=True)`).

  Returns int32 [S / PATH_CELL, S / PATH_CELL]: for every cell of a tube,
  how many cells along the tube it is from the tube's head (0: the marker's
  cell); -1 for cells off the tubes. The same scene as generate_example's
  (the photometric effects come after the painting).
  """
  if split not in SPLIT_IDS:
    raise ValueError(f'unknown split {split!r}; expected one of '
                     f'{sorted(SPLIT_IDS)}.')
  return _scene(split, index, size, difficulty, plain_shapes=False,
                snakes=False, paths=True,
                path_layout=path_layout).path_steps


def hard_patches(label: np.ndarray, patch: int = 16) -> np.ndarray:
  """Which patch x patch tiles of `label` hold more than one class.

  Args:
    label: integer [H, W] label map; H and W multiples of `patch`.
    patch: tile side in pixels (the ViT patch size).

  Returns:
    bool [H / patch, W / patch], True for the "hard" (multi-class) tiles.
  """
  h, w = label.shape
  if h % patch or w % patch:
    raise ValueError(f'label shape {label.shape} is not a multiple of the '
                     f'patch size {patch}.')
  tiles = label.reshape(h // patch, patch, w // patch, patch)
  return tiles.min(axis=(1, 3)) != tiles.max(axis=(1, 3))


def hard_patch_fraction(label: np.ndarray, patch: int = 16) -> float:
  """Fraction in [0, 1] of the tiles `hard_patches` marks."""
  return float(hard_patches(label, patch).mean())


def colourize(label: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] picture of a label map [H, W] in PALETTE colours."""
  return PALETTE[label]
