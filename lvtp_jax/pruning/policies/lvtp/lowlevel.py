"""Per-patch low-level image features for LVTP (specs/lvtp.md §3.1).

Computed once per forward (per image, per window in sliding-window
inference) from the un-normalised RGB image in [0, 1]:

  luma       Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601); with
             color='rgb' the three channels instead (ours, not the spec's)
  scale      optional (ours): the s x s block means of the image, so that
             the Sobel kernels see a coarser scale (s = 1: the image)
  sobel      G = sqrt(Gx^2 + Gy^2 + eps) with the 3x3 Sobel kernels and
             reflect padding without repeating the edge pixel (OpenCV's
             default border, BORDER_REFLECT_101 = numpy's 'reflect'); with
             color='rgb' the largest of the three channels' magnitudes
  pooling    per p x p patch: 'mean' of G, 'max' of G, or 'density', the
             fraction of pixels with G > tau
  color_var  optional second channel: per-patch pixel variance, averaged
             over R, G, B (the spec's `lowlevel=("sobel", "color_var")`)
  normalise  per image, min-max over all patches to [0, 1]; with several
             channels, the mean of the normalised channels

The coarse colour score (color='rgb', scale=4) exists because textures
with strong fine-scale edges inside one class (grass blades, waves, brick
mortar) dominate the spec's luma score, while class boundaries are mostly
colour steps that survive block averaging (docs/quickstart_seg.md, "The edge
score").

Every function is static-shape and batch-first; patch n is at row n // w,
column n % w of the patch grid, the encoder's token order.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

POOLS = ('mean', 'max', 'density')
FEATURES = ('sobel', 'color_var')
COLORS = ('luma', 'rgb')
_LUMA = (0.299, 0.587, 0.114)
_EPS = 1e-12


def unnormalize(images: jax.Array,
                normalization: Tuple[Sequence[float], Sequence[float]]
                ) -> jax.Array:
  """[B, H, W, 3] normalised with (mean, std) in 0..1 units -> RGB in [0, 1]."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in normalization)
  return images.astype(jnp.float32) * std + mean


def luma(rgb: jax.Array) -> jax.Array:
  """[B, H, W, 3] -> [B, H, W] BT.601 luma."""
  return rgb @ jnp.asarray(_LUMA, rgb.dtype)


def luma_of_normalized(images: jax.Array,
                       normalization: Tuple[Sequence[float], Sequence[float]]
                       ) -> jax.Array:
  """luma(unnormalize(images)) as one product: [B, H, W, 3] -> [B, H, W].

  The per-channel affine map folds into the luma weights, so the [B, H, W, 3]
  RGB image is never written (0.3 ms of a quickstart batch of 16 on the dev
  CPU, where the whole edge score takes 1.8 ms).
  """
  mean, std = (np.asarray(v, np.float64) for v in normalization)
  weights = np.asarray(_LUMA, np.float64)
  return (images.astype(jnp.float32) @ jnp.asarray(weights * std, jnp.float32)
          + np.float32(weights @ mean))


def sobel_magnitude(y: jax.Array, eps: float = _EPS) -> jax.Array:
  """[B, H, W, ...] -> same shape: Sobel gradient magnitude over H and W,
  reflect-101 border; trailing axes (channels) are independent.

  Gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] (correlation), Gy = Gx^T.
  """
  pad = ((0, 0), (1, 1), (1, 1)) + ((0, 0),) * (y.ndim - 3)
  p = jnp.pad(y, pad, mode='reflect')
  h, w = y.shape[1:3]
  win = lambda dy, dx: p[:, dy:dy + h, dx:dx + w]
  # Separable: [1, 2, 1] smoothing across the derivative direction.
  gx = (win(0, 2) - win(0, 0)) + 2 * (win(1, 2) - win(1, 0)) + (
      win(2, 2) - win(2, 0))
  gy = (win(2, 0) - win(0, 0)) + 2 * (win(2, 1) - win(0, 1)) + (
      win(2, 2) - win(0, 2))
  return jnp.sqrt(gx * gx + gy * gy + eps)


def block_mean(x: jax.Array, s: int) -> jax.Array:
  """[B, H, W, ...] -> [B, H / s, W / s, ...]: means of s x s pixel blocks."""
  if s == 1:
    return x
  b, h, w = x.shape[:3]
  rest = x.shape[3:]
  return x.reshape((b, h // s, s, w // s, s) + rest).mean(axis=(2, 4))


def edge_magnitude(images: jax.Array,
                   normalization: Tuple[Sequence[float], Sequence[float]],
                   *, color: str = 'luma', scale: int = 1) -> jax.Array:
  """[B, H, W, 3] normalised images -> [B, H / scale, W / scale] Sobel
  magnitude of the un-normalised image's luma (color='luma') or the largest
  over its R, G, B channels (color='rgb'), on s x s block means."""
  if color not in COLORS:
    raise ValueError(f'edge_color={color!r}; expected one of {COLORS}.')
  if color == 'luma':
    y = block_mean(luma_of_normalized(images, normalization), scale)
    return sobel_magnitude(y)
  # Block means commute with the per-channel affine un-normalisation, so it
  # runs on the smaller image.
  rgb = unnormalize(block_mean(images.astype(jnp.float32), scale),
                    normalization)
  return sobel_magnitude(rgb).max(axis=-1)


def _patches(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, ...] -> [B, N, p * p, ...] in row-major patch order."""
  b, h, w = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape((b, h // patch, patch, w // patch, patch) + rest)
  x = jnp.moveaxis(x, 2, 3)
  return x.reshape((b, (h // patch) * (w // patch), patch * patch) + rest)


def patch_pool(g: jax.Array, patch: int, how: str = 'mean',
               tau: float = 0.1) -> jax.Array:
  """[B, H, W] per-pixel values -> [B, N] per patch ('mean'/'max'/'density')."""
  if how not in POOLS:
    raise ValueError(f'edge_pool={how!r}; expected one of {POOLS}.')
  g = _patches(g, patch)
  if how == 'mean':
    return g.mean(axis=-1)
  if how == 'max':
    return g.max(axis=-1)
  return (g > tau).mean(axis=-1, dtype=jnp.float32)


def color_variance(rgb: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, 3] -> [B, N]: per-patch pixel variance, mean over channels."""
  return _patches(rgb, patch).var(axis=2).mean(axis=-1)


def minmax(e: jax.Array, eps: float = 1e-6) -> jax.Array:
  """[B, N] -> [B, N] in [0, 1], per image."""
  lo = e.min(axis=1, keepdims=True)
  hi = e.max(axis=1, keepdims=True)
  return (e - lo) / (hi - lo + eps)


def edge_scores(images: jax.Array,
                normalization: Tuple[Sequence[float], Sequence[float]],
                patch: int, *, pool: str = 'mean', tau: float = 0.1,
                features: Sequence[str] = ('sobel',), color: str = 'luma',
                scale: int = 1) -> jax.Array:
  """Normalised low-level score per patch (module docstring).

  Args:
    images: [B, H, W, 3] normalised images, H and W multiples of `patch`.
    normalization: (mean, std) per channel in 0..1 units.
    patch: patch side p.
    pool: Sobel pooling, one of POOLS.
    tau: 'density' threshold on the Sobel magnitude (image in [0, 1]; the
      magnitude of a unit step is 4).
    features: subset of FEATURES.
    color: the Sobel channel(s), one of COLORS.
    scale: Sobel on the s x s block means of the image; s divides `patch`.

  Returns:
    [B, N] float32 in [0, 1]; high = edge / detail.
  """
  unknown = set(features) - set(FEATURES)
  if unknown or not features:
    raise ValueError(f'lowlevel={tuple(features)}: expected a non-empty '
                     f'subset of {FEATURES}.')
  if scale < 1 or patch % scale:
    raise ValueError(f'edge_scale={scale} must be >= 1 and divide the patch '
                     f'size {patch}, e.g. 1, 2 or 4.')
  channels = []
  if 'sobel' in features:
    g = edge_magnitude(images, normalization, color=color, scale=scale)
    channels.append(minmax(patch_pool(g, patch // scale, pool, tau)))
  if 'color_var' in features:
    rgb = unnormalize(images, normalization)
    channels.append(minmax(color_variance(rgb, patch)))
  return sum(channels) / len(channels)
