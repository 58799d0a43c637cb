"""Position-embedding resampling, matching the reference code paths.

timm and Segmenter resize the patch grid of an absolute position embedding
in different ways, and the difference is far above float32 noise, so the
method is always explicit:

  'bicubic'   timm's `resample_abs_pos_embed` defaults (load-time filter and
              dynamic_img_size): bicubic, antialiased. jax.image.resize's
              'cubic' kernel (Keys, a = -0.5, border renormalised) equals
              torch's antialiased bicubic; antialias only acts on down-sampling.
  'bilinear'  Segmenter's forward-time resize and timm's .npz loader:
              bilinear, align_corners=False, no antialias.

Prefix rows (CLS, dist) are never interpolated.

`sincos2d` is the other kind of position embedding a ViT here can have
(`ViT.posemb='sincos2d'`): fixed, not learnt, computed for whatever grid the
image gives (nothing to resample), as ViTs trained from scratch often use.
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bicubic', 'bilinear')
# The position embeddings a ViT can have: 'learn' (a parameter, timm's and
# Segmenter's) or 'sincos2d' (fixed sines and cosines of the patch row and
# column, see sincos2d).
KINDS = ('learn', 'sincos2d')


def sincos2d(grid_hw: Tuple[int, int], width: int,
             temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding of a patch grid.

  Patch (r, c) of an h x w grid gets the width-D row
    [sin(r w_k), cos(r w_k), sin(c w_k), cos(c w_k)],  k = 0 .. D/4 - 1,
  each a block of D/4 values, with frequencies w_k = temperature^(-k / (D/4))
  (from 1 down towards 1 / temperature). The dot product of two rows
  depends only on their offset (sum_k cos(dr w_k) + cos(dc w_k)), which is
  what lets attention learn "my neighbour" from the start.

  Args:
    grid_hw: (h, w) patch grid.
    width: D, a multiple of 4.
    temperature: the slowest frequency's period scale.

  Returns:
    float32 [1, h * w, D], patches in row-major order.
  """
  if width % 4:
    raise ValueError(f'posemb sincos2d needs a width divisible by 4 (sine and '
                     f'cosine of row and column), got width {width}.')
  h, w = grid_hw
  quarter = width // 4
  freq = temperature ** (-np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64),
                           np.arange(w, dtype=np.float64), indexing='ij')
  r = rows.reshape(-1, 1) * freq
  c = cols.reshape(-1, 1) * freq
  table = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
  return table.astype(np.float32)[None]


def grid_shape(num_patches: int) -> Tuple[int, int]:
  """The square grid a stored position embedding of N patch rows stands for."""
  side = int(round(math.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(
        f'a position embedding with {num_patches} patch rows is not a square '
        'grid; pass the grid explicitly.')
  return side, side


def resample_grid(grid: jax.Array, new_hw: Tuple[int, int],
                  method: str) -> jax.Array:
  """Resizes a position-embedding grid.

  Args:
    grid: [1, h, w, D].
    new_hw: (H, W) target grid.
    method: one of METHODS.

  Returns:
    [1, H, W, D] float32.
  """
  if method not in METHODS:
    raise ValueError(f'posemb resize method must be one of {METHODS}, '
                     f'got {method!r}.')
  grid = jnp.asarray(grid, jnp.float32)
  if tuple(grid.shape[1:3]) == tuple(new_hw):
    return grid
  shape = (grid.shape[0], new_hw[0], new_hw[1], grid.shape[3])
  if method == 'bicubic':
    return jax.image.resize(grid, shape, 'cubic', antialias=True)
  return jax.image.resize(grid, shape, 'linear', antialias=False)


def resample_posemb(posemb, num_prefix: int, new_hw: Tuple[int, int],
                    method: str, old_hw: Tuple[int, int] = None):
  """Resamples the patch rows of a [1, num_prefix + h*w, D] position embedding.

  Works on NumPy arrays (conversion time, returns NumPy) and on traced JAX
  arrays (forward time, returns JAX).
  """
  is_numpy = isinstance(posemb, np.ndarray)
  prefix, patches = posemb[:, :num_prefix], posemb[:, num_prefix:]
  old_hw = old_hw or grid_shape(patches.shape[1])
  if tuple(old_hw) == tuple(new_hw):
    return posemb
  d = patches.shape[-1]
  grid = patches.reshape(1, old_hw[0], old_hw[1], d)
  grid = resample_grid(grid, new_hw, method).reshape(1, -1, d)
  out = jnp.concatenate([jnp.asarray(prefix, jnp.float32), grid], axis=1)
  return np.asarray(out) if is_numpy else out
