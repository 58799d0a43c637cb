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
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bicubic', 'bilinear')


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
