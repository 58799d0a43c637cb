"""Multi-scale Tsallis entropy and its dynamic weights (specs/lvtp.md §3.2).

For a class distribution p over C classes and an entropic index q:
  S_q(p) = (1 - sum_c p_c^q) / (q - 1),   S_1(p) = -sum_c p_c log p_c
(q = 1 is the Shannon limit, handled by its own branch since q is a static
Python float). Each is divided by its maximum, reached at the uniform
distribution, S_q^max = (1 - C^(1-q)) / (q - 1) (S_1^max = log C), so every
scale lies in [0, 1]. Low q weighs the tail of the distribution (rare
classes), high q the top probabilities.

Per image and boundary, the normalised entropies of the active tokens are
fused with weights w_q (sum 1) from one of WEIGHTINGS:
  dispersion  w_q proportional to the standard deviation of S_q over the
              active tokens: the scale that separates tokens best counts most
  ewm         the entropy-weight method: r_qn = S_qn / sum_n S_qn,
              E_q = -(1 / log n) sum_n r_qn log r_qn, w_q prop. to 1 - E_q
  uniform     w_q = 1 / |Q|
  single      one q only (an ablation; Q must have one entry)
When every weight would be 0 (all tokens alike), the weights are uniform.
Probabilities are clipped to [1e-12, 1] and everything is float32.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp

WEIGHTINGS = ('dispersion', 'ewm', 'uniform', 'single')
_TINY = 1e-12


def tsallis_entropy(p: jax.Array, q: float) -> jax.Array:
  """[..., C] probabilities -> [...] S_q (Shannon for q == 1)."""
  p = jnp.clip(p.astype(jnp.float32), _TINY, 1.0)
  if q == 1.0:
    return -jnp.sum(p * jnp.log(p), axis=-1)
  return (1.0 - jnp.sum(p ** q, axis=-1)) / (q - 1.0)


def max_entropy(q: float, num_classes: int) -> float:
  """S_q of the uniform distribution over num_classes classes."""
  if num_classes < 2:
    raise ValueError(f'entropy needs at least 2 classes, got {num_classes}.')
  if q == 1.0:
    return math.log(num_classes)
  return (1.0 - num_classes ** (1.0 - q)) / (q - 1.0)


def normalized_entropies(p: jax.Array, qs: Sequence[float]) -> jax.Array:
  """[..., C] -> [..., |Q|]: S_q / S_q^max for each q, in [0, 1]."""
  c = p.shape[-1]
  return jnp.stack([tsallis_entropy(p, q) / max_entropy(q, c) for q in qs],
                   axis=-1)


def _masked_mean(x, valid, axis):
  n = jnp.maximum(valid.sum(axis=axis, keepdims=True), 1)
  return jnp.sum(jnp.where(valid, x, 0.0), axis=axis, keepdims=True) / n


def fusion_weights(s: jax.Array, valid: jax.Array, how: str) -> jax.Array:
  """Per-image weights of the scales.

  Args:
    s: [B, K, Q] normalised entropies of the slots.
    valid: [B, K] bool, the active slots the statistics run over.
    how: one of WEIGHTINGS.

  Returns:
    [B, Q] float32 weights, non-negative, summing to 1.
  """
  if how not in WEIGHTINGS:
    raise ValueError(f'weighting={how!r}; expected one of {WEIGHTINGS}.')
  b, _, nq = s.shape
  if how == 'single' and nq != 1:
    raise ValueError(f"weighting='single' needs exactly one q, got {nq}; set "
                     'qs=(q0,).')
  if how in ('uniform', 'single'):
    return jnp.full((b, nq), 1.0 / nq, jnp.float32)
  m = valid[..., None]
  if how == 'dispersion':
    mean = _masked_mean(s, m, axis=1)
    raw = jnp.sqrt(_masked_mean((s - mean) ** 2, m, axis=1))[:, 0]
  else:  # ewm
    total = jnp.sum(jnp.where(m, s, 0.0), axis=1, keepdims=True)
    r = jnp.where(m & (total > 0), s / jnp.maximum(total, _TINY), 0.0)
    n = valid.sum(axis=1).astype(jnp.float32)
    log_n = jnp.log(jnp.maximum(n, 2.0))[:, None]
    plogp = jnp.where(r > 0, r * jnp.log(jnp.maximum(r, _TINY)), 0.0)
    e = -plogp.sum(axis=1) / log_n
    # No information (all tokens certain, or fewer than 2 tokens): E = 1.
    e = jnp.where((total[:, 0] > 0) & (n[:, None] >= 2), e, 1.0)
    raw = jnp.clip(1.0 - e, 0.0, None)
  norm = raw.sum(axis=1, keepdims=True)
  return jnp.where(norm > 0, raw / jnp.maximum(norm, _TINY), 1.0 / nq)


def fused_uncertainty(s: jax.Array, valid: jax.Array,
                      how: str) -> jax.Array:
  """[B, K, Q] normalised entropies -> [B, K] U = sum_q w_q S_q in [0, 1]."""
  w = fusion_weights(s, valid, how)
  return jnp.einsum('bkq,bq->bk', s, w)
