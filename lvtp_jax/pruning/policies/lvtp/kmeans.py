"""Masked k-means with a fixed number of Lloyd iterations (jit, static shapes).

Points are the slots of a buffer, `valid` says which take part; every
statistic ignores the others. Leading axes are batch axes (one clustering
per image, or per image and class). Deterministic:
  - initialisation: 1-D, masked quantiles at j / (k - 1), j = 0 .. k-1 (for
    k = 2 the minimum and the maximum, as specs/lvtp.md §7); several
    features, farthest-first traversal from a given first point (the next
    centroid is the valid point farthest from the chosen ones; ties: the
    lower slot);
  - assignment to the nearest centroid, ties to the lower centroid index;
  - a centroid with no point keeps its position;
  - the iterations are unrolled (`iters` is a Python int), so the compiled
    program's FLOP count includes all of them.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from lvtp_jax.pruning import ranking


def masked_quantiles(x: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """[..., K] -> [..., k]: the valid values at ranks round(j (n-1) / (k-1)).

  Rows without a valid value give 0.
  """
  n = valid.sum(axis=-1, keepdims=True)
  frac = jnp.linspace(0.0, 1.0, k) if k > 1 else jnp.zeros((1,))
  rank = jnp.round(frac * jnp.maximum(n - 1, 0)).astype(jnp.int32)
  out = ranking.take_ranked(jnp.where(valid, x, jnp.inf), rank)
  return jnp.where(n > 0, out, 0.0)


def lloyd(x: jax.Array, valid: jax.Array, centroids: jax.Array,
          iters: int) -> Tuple[jax.Array, jax.Array]:
  """Lloyd iterations.

  Args:
    x: [..., K, F] points.
    valid: [..., K] bool.
    centroids: [..., k, F] initial centroids.
    iters: number of assignment + update steps (static).

  Returns:
    (centroids [..., k, F], assign [..., K] int32): the final centroids and
    each point's nearest of them (computed from the final centroids;
    invalid points are assigned too and must be masked by the caller).
  """
  x = x.astype(jnp.float32)
  c = centroids.astype(jnp.float32)
  k = c.shape[-2]

  def assign(c):
    d = jnp.sum((x[..., :, None, :] - c[..., None, :, :]) ** 2, axis=-1)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)   # first index on ties

  for _ in range(iters):
    onehot = (assign(c)[..., None] == jnp.arange(k)) & valid[..., None]
    w = onehot.astype(jnp.float32)                    # [..., K, k]
    count = w.sum(axis=-2)[..., None]                 # [..., k, 1]
    total = jnp.einsum('...nk,...nf->...kf', w, x)
    c = jnp.where(count > 0, total / jnp.maximum(count, 1.0), c)
  return c, assign(c)


def kmeans_1d(x: jax.Array, valid: jax.Array, k: int,
              iters: int) -> Tuple[jax.Array, jax.Array]:
  """1-D k-means: x [..., K] -> (centroids [..., k], assign [..., K])."""
  init = masked_quantiles(x, valid, k)
  c, a = lloyd(x[..., None], valid, init[..., None], iters)
  return c[..., 0], a


def farthest_first(x: jax.Array, valid: jax.Array, first: jax.Array,
                   k: int) -> jax.Array:
  """k initial centroids [..., k, F] by farthest-first traversal.

  Args:
    x: [..., K, F] points.
    valid: [..., K] bool.
    first: [...] int32 slot of the first centroid.
    k: number of centroids.
  """
  x = x.astype(jnp.float32)
  take = lambda i: jnp.take_along_axis(x, i[..., None, None], axis=-2)
  chosen = [take(first)]
  dist = jnp.sum((x - chosen[0]) ** 2, axis=-1)
  for _ in range(1, k):
    nxt = jnp.argmax(jnp.where(valid, dist, -1.0), axis=-1)
    chosen.append(take(nxt))
    dist = jnp.minimum(dist, jnp.sum((x - chosen[-1]) ** 2, axis=-1))
  return jnp.concatenate(chosen, axis=-2)


def cluster_mask(assign: jax.Array, valid: jax.Array,
                 which: jax.Array) -> jax.Array:
  """[..., K] bool: valid points assigned to cluster `which` [...]."""
  return valid & (assign == which[..., None])


def extreme_cluster(x: jax.Array, valid: jax.Array, k: int, iters: int,
                    min_gap: float, lowest: bool) -> jax.Array:
  """The points of the lowest (or highest) 1-D cluster, with a gap guard.

  Args:
    x: [..., K] values.
    valid: [..., K] bool.
    k: clusters (>= 2).
    iters: Lloyd iterations.
    min_gap: when the extreme centroid is closer than this to its
      neighbour, the values do not separate and the result is empty.
    lowest: the lowest cluster (True) or the highest.

  Returns:
    [..., K] bool, a subset of `valid`.
  """
  c, a = kmeans_1d(x, valid, k, iters)
  order = jnp.argsort(c, axis=-1)          # lowest ... highest centroid
  pick = 0 if lowest else k - 1
  near = 1 if lowest else k - 2
  which = order[..., pick]
  ordered = jnp.take_along_axis(c, order, axis=-1)
  gap = jnp.abs(ordered[..., pick] - ordered[..., near])
  return cluster_mask(a, valid, which) & (gap >= min_gap)[..., None]
