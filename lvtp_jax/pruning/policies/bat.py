"""BAT: split by CLS attention, cluster the inattentive tokens, match the
attentive ones (Long et al., CVPR 2023; ../shared/specs/
classification_policies.md §4). BAT has no public code: this is the
reconstruction of spec §4.2, and every choice the spec marks as an
interpretation is a field of config.pruning.bat with the spec's default.

In each block of `layers` (1-based), between the attention residual and the
MLP, on the n non-prefix tokens y:
  split    a_i = head-mean CLS attention (as EViT); the K = ceil(keep_rate
           n) highest are attentive, in decreasing order of a (ties: the
           lower slot first), the other M = n - K inattentive, in slot order;
  cluster  DPC-KNN on the inattentive tokens (`dpc_knn`): c =
           min(ceil(cluster_ratio M), M) clusters, each one token, the
           `cluster_weights`-weighted mean of its members (default: their
           CLS attention a_j, spec §4.2);
  match    ToMe's bipartite soft matching (tome.py's merge) on
           [prefix, attentive], merging r = min(c, K // 2) pairs, on
           `match_metric` ('keys': the block's head-mean keys, as ToMe;
           'x': the tokens), size-weighted;
  output   [prefix, the K - r matched attentive tokens in ToMe's order, the
           c clusters in the order their centres were chosen]: about as
           many tokens as EViT keeps at the same rate (spec §4.2 item 5).
Sizes add up (a cluster stands for its members, `src` maps them to it);
`prop_attn` adds log(size) to the attention logits of the later blocks
(default off: not known for BAT). Static shapes throughout, and no random
jitter: density ties are broken by slot order (the lower slot counts as the
denser).
"""

import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.pruning.policies import evit
from lvtp_jax.pruning.policies import tome
from lvtp_jax.tokens import state as ts

CLUSTER_WEIGHTS = ('cls_attn', 'uniform')
MATCH_METRICS = ('keys', 'x')


@dataclasses.dataclass(frozen=True)
class BATParams:
  keep_rate: float
  layers: Tuple[int, ...]
  cluster_ratio: float
  knn_k: int
  cluster_weights: str
  match_metric: str
  prop_attn: bool


def stage_sizes(params: BATParams, n: int) -> Tuple[int, int, int, int]:
  """(K attentive, M inattentive, c clusters, r merges) for n non-prefix
  tokens; M = 0 means the block changes nothing."""
  k = evit.kept_count(params.keep_rate, n)
  m = n - k
  if m <= 0:
    return n, 0, 0, 0
  c = min(max(math.ceil(params.cluster_ratio * m), 1), m)
  r = min(c, k // 2)
  return k, m, c, r


def dpc_knn(y: jax.Array, c: int, k: int) -> Tuple[jax.Array, jax.Array]:
  """Density-peak clustering with k nearest neighbours (spec §4.2 item 2).

  Args:
    y: [B, M, C] tokens.
    c: static number of clusters (<= M).
    k: static neighbours of the density (the k smallest distances of a
      row, its own zero included, as TCFormer's cluster_dpc_knn; min(k, M)).

  Returns:
    (centres [B, c] int32 token indices, in decreasing centre score;
    assign [B, M] int32 cluster of every token, 0..c-1; every centre in its
    own cluster).
  """
  b, m, ch = y.shape
  y = y.astype(jnp.float32)
  sq = jnp.sum(y * y, axis=-1)
  gram = jnp.einsum('bic,bjc->bij', y, y, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0)
  eye = jnp.eye(m, dtype=bool)
  dist = jnp.where(eye, 0.0, jnp.sqrt(d2)) / math.sqrt(ch)       # delta_ij
  nearest = -jax.lax.top_k(-dist, min(k, m))[0]                  # [B, M, k]
  density = jnp.exp(-jnp.mean(nearest ** 2, axis=-1))            # rho_i
  # j is denser than i: rho_j > rho_i, ties to the lower slot.
  idx = jnp.arange(m)
  denser = ((density[:, None, :] > density[:, :, None]) |
            ((density[:, None, :] == density[:, :, None]) &
             (idx[None, None, :] < idx[None, :, None])))         # [B, i, j]
  row_max = dist.max(axis=-1)
  separation = jnp.where(denser.any(axis=-1),
                         jnp.where(denser, dist, jnp.inf).min(axis=-1),
                         row_max)                                # sigma_i
  score = density * separation                                   # gamma_i
  _, centres = jax.lax.top_k(score, c)
  centres = centres.astype(jnp.int32)
  to_centre = jnp.take_along_axis(dist, centres[:, None, :], axis=2)  # [B,M,c]
  assign = jnp.argmin(to_centre, axis=-1).astype(jnp.int32)
  forced = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  assign = assign.at[jnp.arange(b)[:, None], centres].set(forced)
  return centres, assign


class BAT(evit.LayerReduction):
  """config.pruning.bat: keep_rate, layers, cluster_ratio, knn_k,
  cluster_weights, match_metric, prop_attn."""
  name = 'bat'
  signals = frozenset({'cls_attn', 'keys'})
  summary = ('BAT (Long et al., CVPR 2023; a reconstruction, no public code): '
             'in each of the `layers` the patch tokens are split by CLS '
             "attention; the attentive ones merge in pairs by ToMe's "
             'matching, the inattentive ones are clustered by DPC-KNN into '
             'one token per cluster.')
  field_help = {
      'keep_rate': 'share of the n non-prefix tokens that are attentive, K = '
                   'ceil(keep_rate n) with the highest head-mean CLS '
                   'attention; the other M = n - K are clustered; 1.0 '
                   'changes nothing.',
      'layers': "the 1-based blocks that reduce (as EViT's).",
      'cluster_ratio': 'c = ceil(cluster_ratio M) clusters (1 to M) of the M '
                       'inattentive tokens; the attentive ones then merge r '
                       '= min(c, K // 2) pairs, so about as many tokens '
                       'leave the block as EViT keeps.',
      'knn_k': "k of the DPC-KNN density: exp of minus the mean of a token's "
               'k smallest squared distances (its own zero included).',
      'cluster_weights': "weights of the cluster means: 'cls_attn' (each "
                         "member's CLS attention, the spec's) or 'uniform'.",
      'match_metric': "what the attentive tokens are matched on: 'keys' (the "
                      "block's head-mean attention keys, as ToMe) or 'x' "
                      '(the tokens themselves).',
      'prop_attn': 'proportional attention: log(size) added to the attention '
                   'logits of the blocks after the first reduction (off: not '
                   'known for BAT).',
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.keep_rate = 0.7           # share of the tokens that are attentive
    cfg.layers = (4, 7, 10)       # 1-based blocks (DeiT-S, as EViT)
    cfg.cluster_ratio = 0.25      # [I] clusters c = ceil(ratio M); r = c
    cfg.knn_k = 5                 # [I] DPC-KNN neighbours (TCFormer's)
    cfg.cluster_weights = 'cls_attn'   # [I] or 'uniform'
    cfg.match_metric = 'keys'     # [I] ToMe's metric, or 'x' (the tokens)
    cfg.prop_attn = False         # [I] log(size) on later attention logits
    return cfg

  def make_params(self, cfg, num_stages):
    del num_stages
    keep_rate, layers = self.keep_rate_and_layers(cfg)
    if not 0.0 < cfg.cluster_ratio <= 1.0:
      raise ValueError(f'config.pruning.bat.cluster_ratio={cfg.cluster_ratio} '
                       'must lie in (0, 1] (clusters per inattentive token).')
    if cfg.knn_k < 1:
      raise ValueError(f'config.pruning.bat.knn_k={cfg.knn_k} must be >= 1.')
    if cfg.cluster_weights not in CLUSTER_WEIGHTS:
      raise ValueError(f'config.pruning.bat.cluster_weights='
                       f'{cfg.cluster_weights!r}; expected one of '
                       f'{CLUSTER_WEIGHTS}.')
    if cfg.match_metric not in MATCH_METRICS:
      raise ValueError(f'config.pruning.bat.match_metric={cfg.match_metric!r}'
                       f'; expected one of {MATCH_METRICS}.')
    return BATParams(keep_rate=keep_rate, layers=layers,
                     cluster_ratio=float(cfg.cluster_ratio),
                     knn_k=int(cfg.knn_k),
                     cluster_weights=cfg.cluster_weights,
                     match_metric=cfg.match_metric,
                     prop_attn=bool(cfg.prop_attn))

  def _out(self, params: BATParams, n_in: int, num_prefix: int) -> int:
    k, m, c, r = stage_sizes(params, n_in - num_prefix)
    return n_in if not m else num_prefix + k - r + c

  def reduce(self, ctx, params):
    p = ctx.num_prefix
    state = ctx.state
    bsz, n_in, _ = state.x.shape
    n = n_in - p
    k, m, c, r = stage_sizes(params, n)
    score = ctx.signals['cls_attn'][:, :, p:].astype(jnp.float32).mean(axis=1)
    _, attentive = jax.lax.top_k(jax.lax.stop_gradient(score), k)
    attentive = attentive.astype(jnp.int32)                       # [B, K]
    is_att = (attentive[:, :, None] == jnp.arange(n)[None, None, :]).any(1)
    # The inattentive slots in slot order: a stable sort of the flags.
    inatt = jnp.argsort(is_att, axis=1, stable=True)[:, :m].astype(jnp.int32)
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (bsz, p))
    take = lambda a, idx: jnp.take_along_axis(
        a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    # Attentive: ToMe on [prefix, attentive by score]; its src is over the
    # sub-buffer, so the inattentive patches are -1 there for now.
    sub_old = jnp.concatenate([prefix, attentive + p], axis=1)     # [B, p+K]
    old_to_sub = jnp.full((bsz, n_in), -1, jnp.int32).at[
        jnp.arange(bsz)[:, None], sub_old].set(
            jnp.broadcast_to(jnp.arange(p + k, dtype=jnp.int32),
                             (bsz, p + k)))
    sub = ts.TokenState(x=take(state.x, sub_old),
                        valid=jnp.ones((bsz, p + k), bool),
                        size=take(state.size, sub_old),
                        src=ts.remap_src(state.src, old_to_sub))
    if params.match_metric == 'keys':
      keys = jnp.take_along_axis(ctx.signals['keys'],
                                 sub_old[:, None, :, None], axis=2)
    else:   # the tokens as a one-head metric
      keys = sub.x[:, None]
    matched = tome.merge(sub, keys, r, p) if r else sub

    # Inattentive: DPC-KNN clusters, each a weighted mean of its members.
    y = take(state.x, inatt + p).astype(jnp.float32)              # [B, M, C]
    centres, assign = dpc_knn(jax.lax.stop_gradient(y), c, params.knn_k)
    if params.cluster_weights == 'cls_attn':
      w = take(score, inatt)
    else:
      w = jnp.ones((bsz, m), jnp.float32)
    onehot = jax.nn.one_hot(assign, c, dtype=jnp.float32)         # [B, M, c]
    wsum = jnp.einsum('bmc,bm->bc', onehot, w,
                      precision=jax.lax.Precision.HIGHEST)
    z = jnp.einsum('bmc,bm,bmd->bcd', onehot, w, y,
                   precision=jax.lax.Precision.HIGHEST) / wsum[..., None]
    zsize = jnp.einsum('bmc,bm->bc', onehot, take(state.size, inatt + p),
                       precision=jax.lax.Precision.HIGHEST)
    n_att = p + k - r
    old_to_cluster = jnp.full((bsz, n_in), -1, jnp.int32).at[
        jnp.arange(bsz)[:, None], inatt + p].set(n_att + assign)
    src = jnp.where(matched.src >= 0, matched.src,
                    ts.remap_src(state.src, old_to_cluster))
    return ts.TokenState(
        x=jnp.concatenate([matched.x, z.astype(state.x.dtype)], axis=1),
        valid=jnp.ones((bsz, n_att + c), bool),
        size=jnp.concatenate([matched.size, zsize], axis=1),
        src=src)

  def proportional(self, params):
    return params.prop_attn


registry.register(BAT())
