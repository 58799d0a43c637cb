"""DToP: Dynamic Token Pruning (Tang et al., ICCV 2023); specs/dtop.md.

At every stage boundary (an auxiliary layer), for each active patch:
  conf = max_c softmax(aux logits)_c,  yhat = argmax_c (spec §3 step 3 with
  §7.1: Segmenter heads are softmax heads, so confidence is the max class
  probability rather than SegViT's presence x sigmoid score);
  candidates: conf > threshold (strict, compared in float32, as the code's
  `>`; threshold 1.0 never exits);
  per predicted class, the top_k most confident candidates stay active for
  context (step 4; fewer when the class has fewer candidates);
  exited = candidates minus those kept (step 5). The active set only
  shrinks; a kept token is re-examined at the next boundary (§7.3).
Ties: argmax takes the lowest class id; among equal confidences of a class
the lower patch index is kept (`lax.top_k` returns the lower index first).
The per-class top-k is static-shape: `lax.top_k` over a [B, C, Kp] score
that is -inf outside the class's candidates (spec §8).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry


@dataclasses.dataclass(frozen=True)
class DToPParams:
  threshold: float
  top_k: int


def top_per_class(score: jax.Array, members: jax.Array, classes: jax.Array,
                  num_classes: int, k: int) -> jax.Array:
  """The k highest-scoring members of every class (fewer if it has fewer).

  Args:
    score: [B, Kp] float32 (higher = kept first).
    members: [B, Kp] bool, the slots that compete.
    classes: [B, Kp] int, each slot's class.
    num_classes: C.
    k: per class.

  Returns:
    [B, Kp] bool, a subset of `members`. Equal scores: the lower slot first
    (`lax.top_k` order).
  """
  b, kp = members.shape
  k = min(k, kp)
  if k == 0:
    return jnp.zeros_like(members)
  in_class = classes[:, None, :] == jnp.arange(num_classes)[None, :, None]
  masked = jnp.where(members[:, None, :] & in_class, score[:, None, :],
                     -jnp.inf)
  vals, ids = jax.lax.top_k(masked, k)                   # [B, C, k]
  hits = (vals > -jnp.inf).astype(jnp.int32)
  return jnp.zeros((b, kp), jnp.int32).at[
      jnp.arange(b)[:, None, None], ids].add(hits) > 0


def exit_decisions(logits: jax.Array, valid: jax.Array, threshold: float,
                   top_k: int) -> jax.Array:
  """DToP steps 3-5 on one boundary.

  Args:
    logits: [B, Kp, C] auxiliary-head logits of the patch slots.
    valid: [B, Kp] bool, active patch slots.
    threshold: p0; a slot is a candidate when its confidence is > p0.
    top_k: k, candidates kept per predicted class.

  Returns:
    [B, Kp] bool, the slots that exit.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  conf = probs.max(axis=-1)
  yhat = jnp.argmax(probs, axis=-1)
  cand = valid & (conf > jnp.float32(threshold))
  keep = top_per_class(conf, cand, yhat, logits.shape[-1], top_k)
  return cand & ~keep


# The meaning of an exit policy's `reassemble` field (engine.py, REASSEMBLE).
REASSEMBLE_HELP = (
    "the final prediction of an exited patch: 'logits' (its exit head's "
    "logits, mixed with the decoder's logits: the official DToP rule), "
    "'frozen' (its exit head's class distribution, kept exactly) or "
    "'interpolate' (the decoder logits of the nearest patch on the grid that "
    'reached the decoder).')


class DToP(registry.Policy):
  """config.pruning.dtop: threshold (p0), top_k (k), reassemble."""
  name = 'dtop'
  signals = frozenset({'aux_logits'})
  summary = ('DToP (Tang et al., ICCV 2023): at every stage boundary an active '
             'patch whose auxiliary-head confidence (max softmax probability) '
             'exceeds `threshold` exits with its prediction, except the '
             '`top_k` most confident of each predicted class, which stay as '
             'context.')
  field_help = {
      'threshold': 'p0: a patch is an exit candidate when its max class '
                   'probability is > threshold (strict, in float32); 1.0 '
                   'never exits (official: 0.9 for ViT-B, 0.95 for ViT-L).',
      'top_k': 'k: the most confident candidates of each predicted class '
               'stay active as context (ties: the lower patch index); 0 '
               'keeps none.',
      'reassemble': REASSEMBLE_HELP,
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.threshold = 0.9      # p0, strict '>'; official ViT-B 0.9, ViT-L 0.95
    cfg.top_k = 5            # k per class kept for context (official: 5)
    cfg.reassemble = 'logits'  # 'logits' (official rule) or 'frozen'
    return cfg

  def make_params(self, cfg, num_stages):
    del num_stages
    if not 0.0 <= cfg.threshold <= 1.0:
      raise ValueError(
          f'config.pruning.dtop.threshold={cfg.threshold} must lie in [0, 1] '
          '(a max class probability; 1.0 never exits).')
    if cfg.top_k < 0:
      raise ValueError(f'config.pruning.dtop.top_k={cfg.top_k} must be >= 0 '
                       '(0: keep no context tokens).')
    return DToPParams(threshold=float(cfg.threshold), top_k=int(cfg.top_k))

  def decide(self, ctx, params):
    return exit_decisions(ctx.signals['aux_logits'], ctx.valid,
                          params.threshold, params.top_k)


registry.register(DToP())
