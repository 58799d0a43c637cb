"""EViT: keep the tokens the CLS token attends to, fuse the rest (Liang et al.,
ICLR 2022; ../shared/specs/classification_policies.md §2).

In each block of config.pruning.evit.layers (1-based), between the
attention residual and the MLP, as the official evit.py does:
  a_i = mean over heads of the post-softmax CLS attention row, over every
        non-prefix token i (an earlier fused token is scored like any other;
        not renormalised);
  k   = ceil(keep_rate * n) in float64 (n non-prefix tokens, the fused one
        included); k = n: the block changes nothing, and adds no fused token;
  the k highest a_i are kept, in decreasing order of a_i (ties: the lower
  slot first; torch.topk leaves them unspecified);
  fuse_token: the others are summed into one token with their raw scores as
        weights, f = sum_j a_j y_j (not normalised; the weights carry
        gradients, the choice does not), appended after the kept ones.
Output [prefix, kept by score, fused]. Sizes are tracked (the fused token
stands for the patches it absorbed; `src` points them to it) but EViT uses
no proportional attention. Distilled DeiT: the official model does not
support it; here the CLS and distillation tokens are both kept and only
patch tokens are scored (ours).
"""

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.tokens import state as ts


@dataclasses.dataclass(frozen=True)
class EViTParams:
  keep_rate: float
  layers: Tuple[int, ...]
  fuse_token: bool


def kept_count(keep_rate: float, tokens: int) -> int:
  """ceil(keep_rate * tokens) in float64, as the official code computes it
  (ceil(0.6 * 45) is 27 in float64, 28 in float32)."""
  return math.ceil(keep_rate * tokens)


def fuse(state: ts.TokenState, score: jax.Array, k: int, num_prefix: int,
         fuse_token: bool, weights: Optional[jax.Array] = None
         ) -> ts.TokenState:
  """Keeps the k highest-scoring non-prefix slots, in decreasing score order,
  and (fuse_token) sums the others weighted by their score into one slot.

  Args:
    state: buffer with every slot valid, prefix first.
    score: [B, n] float32 score of each non-prefix slot (gradients reach the
      fused token through it; the choice is made on its stopped value).
    k: static number of slots kept.
    num_prefix: prefix slots, always kept first.
    fuse_token: append the fused token.
    weights: [B, n] weights of the fused sum (default: the score).

  Returns:
    The buffer [prefix, kept, (fused)].
  """
  p = num_prefix
  x, size = state.x, state.size
  _, kept = jax.lax.top_k(jax.lax.stop_gradient(score), k)      # [B, k]
  kept = kept.astype(jnp.int32)
  take = lambda a: jnp.take_along_axis(
      a[:, p:], kept.reshape(kept.shape + (1,) * (a.ndim - 2)), axis=1)
  n = score.shape[1]
  is_kept = (kept[:, :, None] == jnp.arange(n)[None, None, :]).any(axis=1)
  dropped = ~is_kept                                             # [B, n]
  parts_x = [x[:, :p], take(x)]
  parts_size = [size[:, :p], take(size)]
  order = [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (x.shape[0], p)),
           kept + p]
  representative = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (x.shape[0], p)),
       jnp.where(is_kept, jnp.arange(p, p + n, dtype=jnp.int32), -1)], axis=1)
  if fuse_token:
    weights = jnp.where(dropped, score if weights is None else weights, 0.0)
    fused = jnp.einsum('bn,bnd->bd', weights.astype(jnp.float32),
                       x[:, p:].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    parts_x.append(fused[:, None].astype(x.dtype))
    parts_size.append(jnp.where(dropped, size[:, p:], 0.0).sum(
        axis=1, keepdims=True))
    # The fused slot is built on the first dropped slot; every dropped slot
    # ends up there.
    first = jnp.argmax(dropped, axis=1).astype(jnp.int32)[:, None] + p
    order.append(first)
    representative = jnp.where(
        jnp.concatenate([jnp.zeros((x.shape[0], p), bool), dropped], axis=1),
        first, representative)
  new_x = jnp.concatenate(parts_x, axis=1)
  return ts.TokenState(
      x=new_x, valid=jnp.ones(new_x.shape[:2], bool),
      size=jnp.concatenate(parts_size, axis=1),
      src=ts.remap_src(state.src, ts.new_slots(
          jnp.concatenate(order, axis=1), representative)))


class LayerReduction(registry.Policy):
  """An in-block reduction that acts in the listed (1-based) blocks only,
  with a keep rate: EViT, random_drop, BAT. Subclasses give `_out`, the
  slots leaving a listed block; params carry `layers`."""
  kind = 'reduce'
  needs_aux_heads = False

  def keep_rate_and_layers(self, cfg) -> Tuple[float, Tuple[int, ...]]:
    """cfg.keep_rate and cfg.layers, validated (errors name the field)."""
    if not 0.0 < cfg.keep_rate <= 1.0:
      raise ValueError(f'config.pruning.{self.name}.keep_rate={cfg.keep_rate} '
                       'must lie in (0, 1] (the share of tokens kept, e.g. '
                       '0.7).')
    layers = tuple(int(k) for k in cfg.layers)
    if not layers or len(set(layers)) != len(layers) or min(layers) < 1:
      raise ValueError(f'config.pruning.{self.name}.layers='
                       f'{tuple(cfg.layers)}: give distinct 1-based blocks, '
                       'e.g. (4, 7, 10).')
    return float(cfg.keep_rate), tuple(sorted(layers))

  def _out(self, params: Any, n_in: int, num_prefix: int) -> int:
    raise NotImplementedError

  def token_counts(self, params, num_tokens, num_prefix, depth):
    bad = [k for k in params.layers if k > depth]
    if bad:
      raise ValueError(f'config.pruning.{self.name}.layers={params.layers} '
                       f'has {bad}, beyond the model\'s {depth} blocks.')
    counts = [num_tokens]
    for layer in range(1, depth + 1):
      n = counts[-1]
      counts.append(self._out(params, n, num_prefix)
                    if layer in params.layers else n)
    return tuple(counts)


class EViT(LayerReduction):
  """config.pruning.evit: keep_rate, layers (1-based), fuse_token."""
  name = 'evit'
  signals = frozenset({'cls_attn'})
  summary = ('EViT (Liang et al., ICLR 2022): in each of the `layers`, '
             'between the attention and the MLP, keeps the ceil(`keep_rate` '
             'n) patch tokens with the highest head-mean CLS attention and '
             '(`fuse_token`) sums the others, weighted by that attention, '
             'into one token.')
  field_help = {
      'keep_rate': 'rho: share of the n non-prefix tokens kept in each '
                   'listed block, k = ceil(keep_rate n) in float64 (an '
                   'earlier fused token counts as one of the n); 1.0 changes '
                   'nothing.',
      'layers': 'the 1-based blocks that reduce (4, 7, 10 are the official '
                '0-based drop locations 3, 6, 9).',
      'fuse_token': 'sum the dropped tokens into one token, weighted by '
                    'their CLS attention (not normalised), appended after '
                    'the kept ones; False drops them (their patches get src '
                    '-1).',
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.keep_rate = 0.7        # rho: share of the non-prefix tokens kept
    cfg.layers = (4, 7, 10)    # 1-based blocks (official drop_loc 3, 6, 9)
    cfg.fuse_token = True      # sum the dropped tokens into one (official)
    return cfg

  def make_params(self, cfg, num_stages):
    del num_stages
    keep_rate, layers = self.keep_rate_and_layers(cfg)
    return EViTParams(keep_rate=keep_rate, layers=layers,
                      fuse_token=bool(cfg.fuse_token))

  def _out(self, params: EViTParams, n_in: int, num_prefix: int) -> int:
    n = n_in - num_prefix
    k = kept_count(params.keep_rate, n)
    if k >= n:
      return n_in
    return num_prefix + k + (1 if params.fuse_token else 0)

  def reduce(self, ctx, params):
    p = ctx.num_prefix
    n_in = ctx.state.capacity
    score = ctx.signals['cls_attn'][:, :, p:].astype(jnp.float32).mean(axis=1)
    k = kept_count(params.keep_rate, n_in - p)
    return fuse(ctx.state, score, k, p, params.fuse_token)


registry.register(EViT())
