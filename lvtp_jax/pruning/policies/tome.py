"""ToMe: merge r tokens in every block by bipartite soft matching (Bolya et
al., ICLR 2023; ../shared/specs/classification_policies.md §3).

In every block, between the attention residual and the MLP, as the official
tome/merge.py and tome/patch/timm.py do:
  metric  the block's attention keys averaged over heads (qkv bias
          included), divided by their L2 norm (no epsilon); no gradient;
  split   set A = the slots at even positions (0, 2, ...), B = the odd ones,
          in the buffer's current order;
  scores  cosine A x B; the CLS row is -inf (it never merges away) and,
          with a distillation token (position 1, the first of B), so is its
          column (nothing merges into it);
  match   every a in A takes its best b (the first on ties); A is ordered by
          that best score, descending (ties: the lower position first, where
          torch's sort leaves them unspecified); the first r are merged into
          their b, the rest stay;
  merge   size-weighted: x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a),
          s_b <- s_b + sum s_a (computed as the official merge_wavg:
          everything times its size, summed, divided by the merged size);
  order   [the A tokens that stay, in position order (CLS first), then all of
          B in order]; with a distillation token [CLS, dist, the rest of
          each].
r is clipped per block to (n - protected) // 2 (protected: CLS and the
distillation token), n the current count. The schedule is the official
parse_r of (r, inflect): inflect 0 merges r in every block (the last one
included), -1 is the paper's decreasing schedule (2r down to 0). With
prop_attn, log(size) is added to the attention logits of every later block.
"""

import dataclasses
from typing import List

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.tokens import state as ts


@dataclasses.dataclass(frozen=True)
class ToMeParams:
  r: int
  inflect: float
  prop_attn: bool


def schedule(r: int, inflect: float, depth: int) -> List[int]:
  """Tokens merged in each block: the official parse_r for (r, inflect),
  a linear ramp from int(r (1 - inflect)) to 2 r minus that, truncated."""
  if depth == 1:
    return [r]
  start = int(r * (1.0 - inflect))
  end = 2 * r - start
  step = (end - start) / (depth - 1)
  return [int(start + step * i) for i in range(depth)]


def _interleave(even: jax.Array, odd: jax.Array) -> jax.Array:
  """[B, ceil(n/2)], [B, floor(n/2)] -> [B, n]: even[i] at 2i, odd at 2i+1."""
  b, ne = even.shape
  no = odd.shape[1]
  both = jnp.stack([even[:, :no], odd], axis=2).reshape(b, 2 * no)
  return jnp.concatenate([both, even[:, no:]], axis=1) if ne > no else both


def merge(state: ts.TokenState, keys: jax.Array, r: int,
          num_prefix: int) -> ts.TokenState:
  """Bipartite soft matching: merges r tokens of set A into set B.

  Args:
    state: buffer of n slots, all valid, prefix (CLS[, dist]) first.
    keys: [B, H, n, hd] the block's attention keys.
    r: static number of tokens merged (already clipped).
    num_prefix: 1 (CLS) or 2 (CLS, distillation token).

  Returns:
    The buffer of n - r slots in ToMe's order (module docstring).
  """
  bsz, n, _ = state.x.shape
  metric = jax.lax.stop_gradient(keys.astype(jnp.float32).mean(axis=1))
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = metric[:, ::2], metric[:, 1::2]
  na, nb = a.shape[1], b.shape[1]
  scores = jnp.einsum('bid,bjd->bij', a, b,
                      precision=jax.lax.Precision.HIGHEST)
  scores = scores.at[:, 0, :].set(-jnp.inf)             # CLS never merges
  if num_prefix == 2:
    scores = scores.at[:, :, 0].set(-jnp.inf)           # nor into dist
  best = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, na]
  edge = jnp.argsort(-scores.max(axis=-1), axis=-1, stable=True)
  src_idx = edge[:, :r].astype(jnp.int32)
  unm_idx = jnp.sort(edge[:, r:], axis=-1).astype(jnp.int32)
  dst_idx = jnp.take_along_axis(best, src_idx, axis=1)

  # merge_wavg: (x * size) summed, then divided by the summed size.
  size = state.size.astype(jnp.float32)
  xs = state.x.astype(jnp.float32) * size[..., None]
  take = lambda v, idx: jnp.take_along_axis(
      v, idx.reshape(idx.shape + (1,) * (v.ndim - 2)), axis=1)
  xs_a, xs_b, s_a, s_b = xs[:, ::2], xs[:, 1::2], size[:, ::2], size[:, 1::2]
  into = jax.nn.one_hot(dst_idx, nb, dtype=jnp.float32)  # [B, r, nb]
  dst_x = xs_b + jnp.einsum('brn,brd->bnd', into, take(xs_a, src_idx),
                            precision=jax.lax.Precision.HIGHEST)
  dst_s = s_b + jnp.einsum('brn,br->bn', into, take(s_a, src_idx),
                           precision=jax.lax.Precision.HIGHEST)
  unm_x, unm_s = take(xs_a, unm_idx), take(s_a, unm_idx)
  # Old slots the new ones are built on: A slot i is old slot 2i, B slot j
  # old slot 2j + 1.
  unm_old, dst_old = 2 * unm_idx, jnp.broadcast_to(
      2 * jnp.arange(nb, dtype=jnp.int32) + 1, (bsz, nb))
  if num_prefix == 2:
    cat = lambda u, d: jnp.concatenate([u[:, :1], d[:, :1], u[:, 1:],
                                        d[:, 1:]], axis=1)
  else:
    cat = lambda u, d: jnp.concatenate([u, d], axis=1)
  new_s = cat(unm_s, dst_s)
  new_x = (cat(unm_x, dst_x) / new_s[..., None]).astype(state.x.dtype)
  is_src = (src_idx[:, :, None] == jnp.arange(na)[None, None, :]).any(axis=1)
  representative = _interleave(
      jnp.where(is_src, 2 * best + 1, 2 * jnp.arange(na, dtype=jnp.int32)),
      dst_old)
  return ts.TokenState(
      x=new_x, valid=jnp.ones((bsz, n - r), bool), size=new_s,
      src=ts.remap_src(state.src, ts.new_slots(cat(unm_old, dst_old),
                                               representative)))


class ToMe(registry.Policy):
  """config.pruning.tome: r, inflect, prop_attn."""
  name = 'tome'
  kind = 'reduce'
  signals = frozenset({'keys'})
  needs_aux_heads = False
  summary = ('ToMe (Bolya et al., ICLR 2023): in every block, between the '
             'attention and the MLP, merges `r` tokens into their most '
             'similar partners by bipartite soft matching on the head-mean '
             'attention keys (size-weighted means), optionally with '
             'proportional attention.')
  field_help = {
      'r': 'tokens merged per block, before the `inflect` schedule; each '
           'block clips it to half the tokens other than CLS and the '
           'distillation token; 0 merges nothing.',
      'inflect': 'the official merge schedule, a linear ramp over the blocks '
                 'from int(r (1 - inflect)) to 2r minus that: 0 merges `r` '
                 "in every block, -1 ramps from 2r down to 0 (the paper's "
                 'decreasing schedule), +1 from 0 up to 2r.',
      'prop_attn': 'proportional attention: log(size) added to the attention '
                   'logits of every block after the first merge (the '
                   'official off-the-shelf setting).',
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.r = 13             # tokens merged per block (README ViT-S/B: 13)
    cfg.inflect = 0.0      # schedule: 0 constant, -1 decreasing (2r -> 0)
    cfg.prop_attn = True   # log(size) on the attention logits (off-the-shelf)
    return cfg

  def make_params(self, cfg, num_stages):
    del num_stages
    if cfg.r < 0:
      raise ValueError(f'config.pruning.tome.r={cfg.r} must be >= 0 (tokens '
                       'merged per block, e.g. 13).')
    if not -1.0 <= cfg.inflect <= 1.0:
      raise ValueError(f'config.pruning.tome.inflect={cfg.inflect} must lie in '
                       '[-1, 1] (0 constant, -1 the decreasing schedule).')
    return ToMeParams(r=int(cfg.r), inflect=float(cfg.inflect),
                      prop_attn=bool(cfg.prop_attn))

  def token_counts(self, params, num_tokens, num_prefix, depth):
    counts = [num_tokens]
    for r in schedule(params.r, params.inflect, depth):
      n = counts[-1]
      counts.append(n - max(min(r, (n - num_prefix) // 2), 0))
    return tuple(counts)

  def reduce(self, ctx, params):
    r = ctx.state.capacity - ctx.n_out
    return merge(ctx.state, ctx.signals['keys'], r, ctx.num_prefix)

  def proportional(self, params):
    return params.prop_attn


registry.register(ToMe())
