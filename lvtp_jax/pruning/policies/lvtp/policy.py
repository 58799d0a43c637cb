"""LVTP-R: low-level-feature-guided progressive token pruning (reconstruction).

Ouyang et al., "Back to Fundamentals: Low-Level Visual Features Guided
Progressive Token Pruning" (arXiv 2504.17996). Only the abstract was
available, so this is the reconstruction of ../shared/specs/lvtp.md §3
("LVTP-R"); every free choice there is a field of config.pruning.lvtp with
the spec's default. Training-free: it runs on a model whose auxiliary heads
were trained (phase 1), with no pruning fine-tune.

Once per forward (per image, per window in sliding-window inference), a
low-level score e_n in [0, 1] per patch from Sobel edges (lowlevel.py; the
spec's luma Sobel, or ours: edge_color='rgb' and edge_scale, colour edges
at a coarser scale). At
every stage boundary, on the patches still active:
  1. p_n = softmax(auxiliary logits); U_n = sum_q w_q S_q(p_n) / S_q^max,
     the dynamically weighted multi-scale Tsallis entropy (tsallis.py),
     optionally also over 3x3 neighbourhood means of p (spatial_scales);
  2. twice clustering (kmeans.py), `clustering`:
       sequential  pass 1: 1-D k-means (k1) on U; the lowest-U cluster are
                   the easy candidates. Pass 2: 1-D k-means (k2) on e over
                   the candidates; the highest-e cluster are edge tokens,
                   rescued (they stay).
       per_class   as sequential, with pass 1 run within each predicted
                   class (argmax p).
       joint       pass 1: one k-means (k_joint) on (U, 1 - e); the cluster
                   with the lowest U + e is the candidate set. Pass 2: 1-D
                   k-means (k2) on U inside it; the highest-U part
                   (borderline tokens) stays.
     passes=1 stops after pass 1 (no edge rescue / no borderline split).
     Gap guards: a pass whose extreme centroid lies closer than gap1 / gap2
     to its neighbour finds no structure and selects nothing (pass 1: no
     exit; pass 2: no rescue);
  3. optional guards: conf_floor (candidates need max_c p >= it),
     keep_topk_per_class (the k lowest-U exits of every predicted class
     stay, DToP's context rule), context_stride (a regular sub-grid of
     patches stays), label_boundary (patches whose window of active
     patches holds two predicted classes stay: the semantic counterpart of
     the edge rescue, for the pixels the bilinear upsampling blends across
     a class boundary), max_exit_frac (at most that fraction of the
     active patches exits, lowest U first);
  4. the rest exit with their prediction in the exit canvas (engine.py);
     reassemble='frozen' (default) keeps their class distribution, and
     pruned_fill='interpolate' drops them and fills them from the nearest
     patch that reached the decoder instead.
Ties: k-means assigns ties to the lower centroid, budgets and top-k keep the
lower patch index first. All decisions are under stop_gradient (engine.py).
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.pruning import spec as spec_lib
from lvtp_jax.pruning.policies import dtop
from lvtp_jax.pruning.policies.lvtp import kmeans
from lvtp_jax.pruning.policies.lvtp import lowlevel
from lvtp_jax.pruning.policies.lvtp import tsallis
from lvtp_jax.tokens import state as ts

CLUSTERINGS = ('sequential', 'per_class', 'joint')
PRUNED_FILL = ('exit', 'interpolate')


@dataclasses.dataclass(frozen=True)
class LVTPParams:
  qs: Tuple[float, ...]
  weighting: str
  spatial_scales: Tuple[int, ...]
  clustering: str
  passes: int
  k1: int
  k2: int
  k_joint: int
  iters: int
  gap1: float
  gap2: float
  edge_pool: str
  edge_tau: float
  edge_color: str
  edge_scale: int
  lowlevel: Tuple[str, ...]
  conf_floor: float
  keep_topk_per_class: int
  context_stride: int
  label_boundary: int
  max_exit_frac: Tuple[float, ...]   # per stage


def neighbourhood_mean(probs: jax.Array, ctx: registry.StageContext,
                       size: int) -> jax.Array:
  """[B, Kp, C] -> [B, Kp, C]: mean of p over the active patches in the
  size x size patch neighbourhood of every slot (itself included)."""
  b, _, c = probs.shape
  h, w = ctx.grid
  per_patch = ts.patch_values(probs, ctx.src)                # 0 if exited
  active = (ctx.src >= 0).astype(jnp.float32)
  stacked = jnp.concatenate([per_patch * active[..., None],
                             active[..., None]], axis=-1).reshape(b, h, w,
                                                                  c + 1)
  summed = jax.lax.reduce_window(stacked, 0.0, jax.lax.add,
                                 (1, size, size, 1), (1, 1, 1, 1), 'SAME')
  summed = summed.reshape(b, h * w, c + 1)
  mean = summed[..., :c] / jnp.maximum(summed[..., c:], 1.0)
  return ctx.patch_to_slot(mean, fill=0.0)


def context_grid(ctx: registry.StageContext, stride: int) -> jax.Array:
  """[B, Kp] bool: slots holding a patch at (row, col) % stride == (0, 0)."""
  h, w = ctx.grid
  patch = jnp.arange(h * w)
  on_grid = ((patch // w) % stride == 0) & ((patch % w) % stride == 0)
  b = ctx.src.shape[0]
  return ctx.patch_to_slot(jnp.broadcast_to(on_grid, (b, h * w)), fill=False)


def label_boundary(probs: jax.Array, ctx: registry.StageContext,
                   size: int) -> jax.Array:
  """[B, Kp, C] -> [B, Kp] bool: slots whose size x size patch neighbourhood
  (itself and the active patches around it) holds more than one predicted
  class (argmax p), i.e. the patches next to a predicted class boundary."""
  b, _, c = probs.shape
  h, w = ctx.grid
  onehot = jax.nn.one_hot(jnp.argmax(probs, axis=-1), c, dtype=jnp.float32)
  onehot = onehot * ctx.valid[..., None]
  per_patch = ts.patch_values(onehot, ctx.src)               # 0 if exited
  present = jax.lax.reduce_window(per_patch.reshape(b, h, w, c), 0.0,
                                  jax.lax.max, (1, size, size, 1),
                                  (1, 1, 1, 1), 'SAME')
  mixed = present.reshape(b, h * w, c).sum(axis=-1) > 1.5
  return ctx.patch_to_slot(mixed, fill=False)


def uncertainty(probs: jax.Array, ctx: registry.StageContext,
                params: LVTPParams) -> jax.Array:
  """[B, Kp, C] -> [B, Kp] fused normalised multi-scale Tsallis entropy."""
  scales = []
  for size in params.spatial_scales:
    p = probs if size == 1 else neighbourhood_mean(probs, ctx, size)
    scales.append(tsallis.normalized_entropies(p, params.qs))
  s = jnp.concatenate(scales, axis=-1)                       # [B, Kp, F]
  return tsallis.fused_uncertainty(s, ctx.valid, params.weighting)


def _joint_pass(u, edge, valid, params):
  """Pass 1 of clustering='joint': the easiest cluster of (U, 1 - e)."""
  feats = jnp.stack([u, 1.0 - edge], axis=-1)                # [B, Kp, 2]
  first = jnp.argmin(jnp.where(valid, u + edge, jnp.inf), axis=-1)
  init = kmeans.farthest_first(feats, valid, first, params.k_joint)
  c, a = kmeans.lloyd(feats, valid, init, params.iters)
  which = jnp.argmin(c[..., 0] + 1.0 - c[..., 1], axis=-1)   # lowest U + e
  centre = jnp.take_along_axis(c, which[:, None, None], axis=1)  # [B,1,2]
  others = jnp.sum((c - centre) ** 2, axis=-1)
  others = jnp.where(jnp.arange(params.k_joint) == which[:, None], jnp.inf,
                     others)
  gap = jnp.sqrt(others.min(axis=-1))
  return kmeans.cluster_mask(a, valid, which) & (gap >= params.gap1)[:, None]


def exit_decisions(probs: jax.Array, edge: jax.Array,
                   ctx: registry.StageContext,
                   params: LVTPParams) -> jax.Array:
  """[B, Kp] bool: the active slots that exit at this boundary.

  Args:
    probs: [B, Kp, C] float32 class probabilities of the slots.
    edge: [B, Kp] low-level score of the slots, in [0, 1].
    ctx: the boundary (valid slots, grid, stage).
    params: LVTPParams.
  """
  valid = ctx.valid
  u = uncertainty(probs, ctx, params)
  yhat = jnp.argmax(probs, axis=-1)
  # Pass 1: the easy candidates.
  if params.clustering == 'joint':
    cand = _joint_pass(u, edge, valid, params)
  elif params.clustering == 'sequential':
    cand = kmeans.extreme_cluster(u, valid, params.k1, params.iters,
                                  params.gap1, lowest=True)
  else:  # per_class: one clustering per predicted class, [B, C, Kp]
    c = probs.shape[-1]
    in_class = valid[:, None, :] & (
        yhat[:, None, :] == jnp.arange(c)[None, :, None])
    cand = kmeans.extreme_cluster(
        jnp.broadcast_to(u[:, None, :], in_class.shape), in_class,
        params.k1, params.iters, params.gap1, lowest=True).any(axis=1)
  if params.conf_floor > 0:
    cand = cand & (probs.max(axis=-1) >= params.conf_floor)
  # Pass 2: rescue the edge tokens (joint: the borderline-U tokens).
  exits = cand
  if params.passes == 2:
    x = u if params.clustering == 'joint' else edge
    exits = cand & ~kmeans.extreme_cluster(x, cand, params.k2, params.iters,
                                           params.gap2, lowest=False)
  if params.keep_topk_per_class:
    exits = exits & ~dtop.top_per_class(-u, exits, yhat, probs.shape[-1],
                                        params.keep_topk_per_class)
  if params.context_stride:
    exits = exits & ~context_grid(ctx, params.context_stride)
  if params.label_boundary:
    exits = exits & ~label_boundary(probs, ctx, params.label_boundary)
  frac = params.max_exit_frac[ctx.stage]
  if frac < 1.0:
    rank = registry.ranks(jnp.where(exits, u, jnp.inf))
    budget = jnp.floor(frac * valid.sum(axis=1).astype(jnp.float32))
    exits = exits & (rank < budget.astype(rank.dtype)[:, None])
  return exits & valid


class LVTP(registry.Policy):
  """config.pruning.lvtp (module docstring; defaults: specs/lvtp.md §4)."""
  name = 'lvtp'
  signals = frozenset({'aux_logits', 'image'})
  needs_normalization = True
  summary = ('LVTP-R, the reconstruction of Ouyang et al. (arXiv 2504.17996) '
             'in specs/lvtp.md, training-free: at every stage boundary the '
             'active patches in the k-means cluster of lowest uncertainty U '
             '(fused multi-scale Tsallis entropy of the auxiliary head) exit, '
             'except those a second k-means finds on strong low-level (Sobel) '
             'edges, which stay; optional guards keep more.')
  field_help = {
      'qs': 'entropic indices q of the Tsallis entropies of the '
            "auxiliary head's class distribution (each divided by its "
            'maximum) that are fused into U; 1.0 is Shannon.',
      'weighting': 'how the normalised entropies are fused into U per image '
                   "and boundary: 'dispersion' (weights proportional to "
                   "their standard deviation over the active patches), 'ewm' "
                   "(the entropy-weight method), 'uniform', or 'single' (one "
                   'q and one spatial scale only).',
      'spatial_scales': 'odd neighbourhood sides whose entropies enter U: 1 '
                        "is each patch's own distribution, 3 adds the mean "
                        'distribution of the active patches in its 3x3 '
                        'neighbourhood.',
      'clustering': "pass 1, which finds the easy candidates: 'sequential' "
                    '(1-D k-means on U with `k1` clusters, the lowest '
                    "cluster), 'per_class' (the same within each predicted "
                    "class) or 'joint' (k-means on (U, 1 - e) with `k_joint` "
                    'clusters, e the edge score; the cluster of lowest U + '
                    'e).',
      'passes': '2: a second 1-D k-means (`k2` clusters) on the candidates '
                'keeps its highest cluster active: the edge rescue on e '
                "('joint': the borderline patches, on U); 1: pass 1 only.",
      'k1': "clusters of pass 1's 1-D k-means on U (clustering 'sequential' "
            "and 'per_class').",
      'k2': "clusters of pass 2's 1-D k-means (on e; with 'joint' on U).",
      'k_joint': "clusters of the 2-D k-means on (U, 1 - e) of clustering "
                 "'joint'.",
      'iters': 'Lloyd iterations of every k-means (a fixed, unrolled '
               'number).',
      'gap1': 'gap guard of pass 1: when the lowest centroid lies closer '
              "than this to the next one (in U; 'joint': Euclidean in (U, 1 "
              '- e)), there is no easy cluster and nothing exits (per image;'
              " 'per_class': per class).",
      'gap2': 'gap guard of pass 2: when the highest centroid lies closer '
              'than this to the next one, nothing is rescued (every '
              'candidate exits).',
      'edge_pool': 'how the Sobel magnitude G is pooled per patch into the '
                   "edge score: 'mean', 'max', or 'density' (the fraction of "
                   'pixels with G > `edge_tau`).',
      'edge_tau': 'threshold on the Sobel magnitude (pixels in [0, 1]) of '
                  "`edge_pool`='density'; unused by the other pools.",
      'edge_color': "'luma': Sobel on the BT.601 luma (the spec's); 'rgb': "
                    "the largest of the R, G and B channels' Sobel "
                    'magnitudes (ours).',
      'edge_scale': 's: Sobel on the s x s block means of the image, a '
                    'coarser scale (s divides the patch size; 1: the image '
                    'itself; ours).',
      'lowlevel': 'the low-level features averaged into the edge score e, '
                  "each min-max normalised per image: 'sobel' and optionally "
                  "'color_var' (per-patch pixel variance, mean over R, G, B).",
      'conf_floor': 'pass-1 candidates also need a max class probability >= '
                    'this (0: off).',
      'keep_topk_per_class': "DToP's context rule: the k lowest-U exits of "
                             'every predicted class stay active (0: off).',
      'context_stride': 'patches whose row and column are multiples of this '
                        'stride always stay, a regular context sub-grid (0: '
                        'off).',
      'label_boundary': 'odd window side >= 3: a patch stays when the active '
                        'patches in its window (itself included) hold more '
                        'than one predicted class, i.e. at a predicted class '
                        'boundary (0: off).',
      'max_exit_frac': 'at most this fraction of the active patches exits at '
                       'a boundary, the lowest U first (floor per image): one '
                       'value per boundary or one for all; 1.0: no limit.',
      'reassemble': dtop.REASSEMBLE_HELP + " `pruned_fill`='interpolate' "
                    'overrides it.',
      'pruned_fill': "'exit': an exited patch keeps its exit-canvas "
                     "prediction (per `reassemble`); 'interpolate': it takes "
                     'the decoder logits of the nearest patch that reached '
                     "the decoder (the same as `reassemble`='interpolate').",
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.qs = (0.5, 1.0, 2.0)       # entropic indices; 1.0 = Shannon
    cfg.weighting = 'dispersion'   # tsallis.WEIGHTINGS
    cfg.spatial_scales = (1,)      # 1: the token; 3: + 3x3 neighbourhood mean
    cfg.clustering = 'sequential'  # CLUSTERINGS
    cfg.passes = 2                 # 1: no edge rescue / borderline split
    cfg.k1 = 2                     # clusters of the semantic pass
    cfg.k2 = 2                     # clusters of the edge (second) pass
    cfg.k_joint = 3                # clusters of the joint 2-D pass
    cfg.iters = 10                 # Lloyd iterations (fixed, unrolled)
    cfg.gap1 = 0.05                # gap guard of pass 1 (U units)
    cfg.gap2 = 0.05                # gap guard of pass 2
    cfg.edge_pool = 'mean'         # lowlevel.POOLS
    cfg.edge_tau = 0.1             # 'density' threshold on |Sobel|
    cfg.edge_color = 'luma'        # lowlevel.COLORS; 'rgb': the largest
                                   # of the R, G, B Sobel magnitudes (ours)
    cfg.edge_scale = 1             # Sobel on s x s block means (ours);
                                   # s divides the patch size
    cfg.lowlevel = ('sobel',)      # lowlevel.FEATURES
    cfg.conf_floor = 0.0           # candidates need max p >= it (0: off)
    cfg.keep_topk_per_class = 0    # DToP's context rule (0: off)
    cfg.context_stride = 0         # keep a regular patch sub-grid (0: off)
    cfg.label_boundary = 0         # keep patches at a predicted class
                                   # boundary in this odd window (0: off)
    cfg.max_exit_frac = (1.0,)     # per stage, of the active patches
    cfg.reassemble = 'frozen'      # 'frozen' or 'logits' (engine.py)
    cfg.pruned_fill = 'exit'       # PRUNED_FILL
    return cfg

  def reassemble(self, cfg):
    if cfg.get('pruned_fill', 'exit') == 'interpolate':
      return 'interpolate'
    return cfg.get('reassemble', 'frozen')

  def make_params(self, cfg, num_stages):
    field = lambda name: f'config.pruning.lvtp.{name}={cfg[name]!r}'
    qs = tuple(float(q) for q in cfg.qs)
    if not qs or min(qs) <= 0:
      raise ValueError(f'{field("qs")}: give one or more entropic indices '
                       'q > 0 (1.0 is Shannon), e.g. (0.5, 1.0, 2.0).')
    if cfg.weighting not in tsallis.WEIGHTINGS:
      raise ValueError(f'{field("weighting")} is not one of '
                       f'{tsallis.WEIGHTINGS}.')
    scales = tuple(int(s) for s in cfg.spatial_scales)
    if not scales or any(s < 1 or s % 2 == 0 for s in scales):
      raise ValueError(f'{field("spatial_scales")}: odd neighbourhood sides '
                       '>= 1, e.g. (1,) or (1, 3).')
    if cfg.weighting == 'single' and len(qs) * len(scales) != 1:
      raise ValueError("config.pruning.lvtp.weighting='single' uses one "
                       f'entropy; got qs={qs} and spatial_scales={scales}. '
                       'Set qs=(q0,) and spatial_scales=(1,).')
    if cfg.clustering not in CLUSTERINGS:
      raise ValueError(f'{field("clustering")} is not one of {CLUSTERINGS}.')
    if cfg.passes not in (1, 2):
      raise ValueError(f'{field("passes")}: 1 or 2.')
    for name in ('k1', 'k2', 'k_joint'):
      if cfg[name] < 2:
        raise ValueError(f'{field(name)}: k-means needs at least 2 clusters.')
    if cfg.iters < 1:
      raise ValueError(f'{field("iters")}: at least 1 Lloyd iteration.')
    for name in ('gap1', 'gap2', 'conf_floor', 'edge_tau'):
      if cfg[name] < 0:
        raise ValueError(f'{field(name)} must be >= 0.')
    if cfg.conf_floor > 1:
      raise ValueError(f'{field("conf_floor")} is a probability in [0, 1].')
    if cfg.edge_pool not in lowlevel.POOLS:
      raise ValueError(f'{field("edge_pool")} is not one of {lowlevel.POOLS}.')
    if cfg.get('edge_color', 'luma') not in lowlevel.COLORS:
      raise ValueError(f'{field("edge_color")} is not one of '
                       f'{lowlevel.COLORS}.')
    if int(cfg.get('edge_scale', 1)) < 1:
      raise ValueError(f'{field("edge_scale")}: a block side >= 1 that '
                       'divides the patch size, e.g. 1, 2 or 4.')
    features = tuple(cfg.lowlevel)
    if not features or set(features) - set(lowlevel.FEATURES):
      raise ValueError(f'{field("lowlevel")}: a non-empty subset of '
                       f'{lowlevel.FEATURES}.')
    if cfg.keep_topk_per_class < 0:
      raise ValueError(f'{field("keep_topk_per_class")} must be >= 0.')
    if cfg.context_stride < 0:
      raise ValueError(f'{field("context_stride")} must be >= 0 (0: off).')
    lb = int(cfg.get('label_boundary', 0))
    if lb < 0 or (lb and lb % 2 == 0) or lb == 1:
      raise ValueError(f'config.pruning.lvtp.label_boundary={lb}: 0 (off) '
                       'or an odd window side >= 3, e.g. 3.')
    fracs = tuple(float(f) for f in spec_lib.per_stage(
        cfg.max_exit_frac, num_stages, 'config.pruning.lvtp.max_exit_frac',
        1.0))
    if any(not 0.0 <= f <= 1.0 for f in fracs):
      raise ValueError(f'{field("max_exit_frac")}: fractions in [0, 1].')
    if cfg.pruned_fill not in PRUNED_FILL:
      raise ValueError(f'{field("pruned_fill")} is not one of {PRUNED_FILL}.')
    return LVTPParams(
        qs=qs, weighting=cfg.weighting, spatial_scales=scales,
        clustering=cfg.clustering, passes=int(cfg.passes), k1=int(cfg.k1),
        k2=int(cfg.k2), k_joint=int(cfg.k_joint), iters=int(cfg.iters),
        gap1=float(cfg.gap1), gap2=float(cfg.gap2), edge_pool=cfg.edge_pool,
        edge_tau=float(cfg.edge_tau),
        edge_color=cfg.get('edge_color', 'luma'),
        edge_scale=int(cfg.get('edge_scale', 1)), lowlevel=features,
        conf_floor=float(cfg.conf_floor),
        keep_topk_per_class=int(cfg.keep_topk_per_class),
        context_stride=int(cfg.context_stride), label_boundary=lb,
        max_exit_frac=fracs)

  def prepare(self, images, params, *, normalization, patch_size):
    return lowlevel.edge_scores(images, normalization, patch_size,
                                pool=params.edge_pool, tau=params.edge_tau,
                                features=params.lowlevel,
                                color=params.edge_color,
                                scale=params.edge_scale)

  def decide(self, ctx, params):
    probs = jax.nn.softmax(ctx.signals['aux_logits'].astype(jnp.float32),
                           axis=-1)
    edge = ctx.patch_to_slot(ctx.prepared, fill=0.0)
    return exit_decisions(probs, edge, ctx, params)


registry.register(LVTP())
