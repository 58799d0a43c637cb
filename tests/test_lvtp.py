"""LVTP-R: its parts against closed forms, NumPy and SciPy; the policy in the
engine (masked oracle vs buffer, all-exit, static shapes).

The NumPy code here re-states ../shared/specs/lvtp.md §3 per image with
plain loops; it shares no code with lvtp_jax/pruning.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from lvtp_jax import pruning
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.pruning import ranking
from lvtp_jax.pruning import registry
from lvtp_jax.pruning.policies import lvtp
from lvtp_jax.pruning.policies.lvtp import kmeans
from lvtp_jax.pruning.policies.lvtp import lowlevel
from lvtp_jax.pruning.policies.lvtp import tsallis
from tests import tiny_segmenter as tiny

NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# ----------------------------------------------------------------------------
# Tsallis entropy.
# ----------------------------------------------------------------------------


def _random_probs(rng, shape, sharpness=3.0):
  logits = rng.normal(0, sharpness, shape)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_tsallis_closed_forms():
  rng = np.random.default_rng(0)
  c = 7
  p = _random_probs(rng, (50, c))
  shannon = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(tsallis.tsallis_entropy(p, 1.0), shannon,
                             rtol=1e-5)
  # q -> 1 is the Shannon limit, from both sides.
  for q in (1 - 1e-3, 1 + 1e-3):
    np.testing.assert_allclose(tsallis.tsallis_entropy(p, q), shannon,
                               rtol=2e-3, atol=1e-4)
  # q = 2: the Gini impurity 1 - sum p^2; q = 0.5: 2 (sum sqrt(p) - 1).
  np.testing.assert_allclose(tsallis.tsallis_entropy(p, 2.0),
                             1 - (p ** 2).sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tsallis.tsallis_entropy(p, 0.5),
                             2 * (np.sqrt(p).sum(-1) - 1), rtol=1e-5,
                             atol=1e-6)
  qs = (0.5, 1.0, 2.0, 3.0)
  uniform = np.full((1, c), 1 / c)
  onehot = np.eye(c)[[3]]
  np.testing.assert_allclose(tsallis.normalized_entropies(uniform, qs), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(tsallis.normalized_entropies(onehot, qs), 0.0,
                             atol=1e-5)
  s = np.asarray(tsallis.normalized_entropies(p, qs))
  assert (s > 0).all() and (s < 1).all()
  assert tsallis.max_entropy(1.0, c) == math.log(c)
  assert tsallis.max_entropy(2.0, c) == pytest.approx(1 - 1 / c)
  with pytest.raises(ValueError, match='at least 2 classes'):
    tsallis.max_entropy(2.0, 1)


def _numpy_weights(s, valid, how):
  """Per-image weights of [K, Q] normalised entropies (spec §3.2)."""
  a = s[valid]
  nq = s.shape[1]
  if how in ('uniform', 'single'):
    return np.full(nq, 1 / nq)
  if how == 'dispersion':
    raw = a.std(axis=0)
  else:
    raw = np.zeros(nq)
    for q in range(nq):
      total = a[:, q].sum()
      if total <= 0 or len(a) < 2:
        continue
      r = a[:, q] / total
      r = r[r > 0]
      raw[q] = max(0.0, 1 + (r * np.log(r)).sum() / np.log(len(a)))
  return raw / raw.sum() if raw.sum() > 0 else np.full(nq, 1 / nq)


@pytest.mark.parametrize('how', ['dispersion', 'ewm', 'uniform'])
def test_fusion_weights_match_numpy(how):
  rng = np.random.default_rng(1)
  b, k, c = 4, 30, 6
  qs = (0.5, 1.0, 2.0)
  p = _random_probs(rng, (b, k, c))
  s = np.asarray(tsallis.normalized_entropies(p, qs), np.float64)
  valid = rng.random((b, k)) < 0.7
  valid[3] = False
  valid[3, :1] = True            # one token: no dispersion, uniform weights
  w = np.asarray(tsallis.fusion_weights(s.astype(np.float32), valid, how))
  for i in range(b):
    np.testing.assert_allclose(w[i], _numpy_weights(s[i], valid[i], how),
                               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[3], 1 / 3, rtol=1e-6)
  u = tsallis.fused_uncertainty(s.astype(np.float32), valid, how)
  np.testing.assert_allclose(u, np.einsum('bkq,bq->bk', s, w), rtol=1e-5)
  with pytest.raises(ValueError, match='exactly one q'):
    tsallis.fusion_weights(s, valid, 'single')


# ----------------------------------------------------------------------------
# k-means.
# ----------------------------------------------------------------------------


def _numpy_kmeans(x, valid, init, iters):
  """Lloyd on the valid rows of x [K, F] from init [k, F]."""
  pts = x[valid]
  c = init.astype(np.float64).copy()
  for _ in range(iters + 1):
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assign = d.argmin(-1)
    if _ == iters:
      return c, assign
    a = assign[valid]
    for j in range(len(c)):
      if (a == j).any():
        c[j] = pts[a == j].mean(0)


def _numpy_init_1d(x, valid, k):
  v = np.sort(x[valid])
  ranks = [int(np.round(j * (len(v) - 1) / (k - 1))) for j in range(k)]
  return v[ranks][:, None]


@pytest.mark.parametrize('count_max', [ranking.COUNT_MAX_SLOTS, 0])
@pytest.mark.parametrize('k', [2, 3, 4])
def test_kmeans_1d_matches_numpy(k, count_max, monkeypatch):
  # Both ways of taking the initial quantiles: counting ranks and sorting.
  monkeypatch.setattr(ranking, 'COUNT_MAX_SLOTS', count_max)
  rng = np.random.default_rng(k)
  b, n = 6, 40
  # Three well-separated groups plus noise.
  x = np.concatenate([rng.normal(0.1, 0.03, (b, 15)),
                      rng.normal(0.5, 0.05, (b, 15)),
                      rng.normal(0.9, 0.02, (b, 10))], axis=1)
  x = np.take_along_axis(x, rng.permuted(np.tile(np.arange(n), (b, 1)), axis=1), 1)
  valid = rng.random((b, n)) < 0.8
  c, a = kmeans.kmeans_1d(x.astype(np.float32), valid, k, iters=7)
  for i in range(b):
    want_c, want_a = _numpy_kmeans(x[i, :, None], valid[i],
                                   _numpy_init_1d(x[i], valid[i], k), 7)
    np.testing.assert_allclose(np.asarray(c)[i], want_c[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(a)[i][valid[i]],
                                  want_a[valid[i]])


def test_kmeans_2d_farthest_first_matches_numpy():
  rng = np.random.default_rng(5)
  b, n, k = 3, 50, 3
  x = rng.random((b, n, 2))
  valid = rng.random((b, n)) < 0.9
  first = np.array([np.flatnonzero(v)[0] for v in valid])
  init = kmeans.farthest_first(x.astype(np.float32), valid, first, k)
  c, a = kmeans.lloyd(x.astype(np.float32), valid, init, iters=10)
  for i in range(b):
    chosen = [first[i]]
    for _ in range(k - 1):
      d = np.min([((x[i] - x[i, j]) ** 2).sum(-1) for j in chosen], axis=0)
      d[~valid[i]] = -1
      chosen.append(int(d.argmax()))
    np.testing.assert_allclose(np.asarray(init)[i], x[i, chosen], rtol=1e-6)
    want_c, want_a = _numpy_kmeans(x[i], valid[i], x[i, chosen], 10)
    np.testing.assert_allclose(np.asarray(c)[i], want_c, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(a)[i][valid[i]],
                                  want_a[valid[i]])


def test_extreme_cluster_and_gap_guard():
  x = np.array([[0.1, 0.12, 0.9, 0.88, 0.11, 0.5],
                [0.4, 0.41, 0.42, 0.40, 0.41, 0.42]], np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  low = np.asarray(kmeans.extreme_cluster(x, valid, 2, 10, 0.05, True))
  high = np.asarray(kmeans.extreme_cluster(x, valid, 2, 10, 0.05, False))
  np.testing.assert_array_equal(low[0], [1, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(high[0], [0, 0, 1, 1, 0, 0])
  # Row 1 spans 0.02: no two clusters 0.05 apart, so nothing is selected.
  assert not low[1].any() and not high[1].any()
  # No valid point at all: empty, finite.
  none = kmeans.extreme_cluster(x, np.zeros_like(valid), 2, 10, 0.0, True)
  assert not np.asarray(none).any()


# ----------------------------------------------------------------------------
# Low-level features.
# ----------------------------------------------------------------------------


def _scipy_sobel(y):
  """|Sobel| per image [B, H, W]; OpenCV's default border (reflect-101) is
  SciPy's 'mirror'. Per image: on a 3-D array SciPy smooths the batch axis
  too."""
  out = []
  for img in y.astype(np.float64):
    out.append(np.hypot(ndimage.sobel(img, axis=1, mode='mirror'),
                        ndimage.sobel(img, axis=0, mode='mirror')))
  return np.stack(out)


def test_sobel_matches_scipy_and_pooling():
  rng = np.random.default_rng(2)
  rgb = rng.random((2, 16, 24, 3)).astype(np.float32)
  rgb[1, :, :12] = 0.2   # a flat region and a step edge
  y = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  got = np.asarray(lowlevel.sobel_magnitude(y, eps=0.0))
  np.testing.assert_allclose(got, _scipy_sobel(y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lowlevel.luma(rgb), y, rtol=1e-6)

  g = got
  p = 8
  blocks = g.reshape(2, 2, p, 3, p).transpose(0, 1, 3, 2, 4).reshape(2, 6, -1)
  np.testing.assert_allclose(lowlevel.patch_pool(g, p, 'mean'),
                             blocks.mean(-1), rtol=1e-5)
  np.testing.assert_allclose(lowlevel.patch_pool(g, p, 'max'),
                             blocks.max(-1), rtol=1e-6)
  np.testing.assert_allclose(lowlevel.patch_pool(g, p, 'density', 0.5),
                             (blocks > 0.5).mean(-1), rtol=1e-6)
  var = rgb.reshape(2, 2, p, 3, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
      2, 6, -1, 3).var(2).mean(-1)
  np.testing.assert_allclose(lowlevel.color_variance(rgb, p), var, rtol=1e-4,
                             atol=1e-7)
  with pytest.raises(ValueError, match='edge_pool'):
    lowlevel.patch_pool(g, p, 'median')


def test_edge_scores_undo_the_normalisation():
  rng = np.random.default_rng(3)
  rgb = rng.random((2, 16, 16, 3)).astype(np.float32)
  rgb[0, :, :8] = 0.3    # the left patches flat: their score is the lowest
  mean, std = (np.asarray(NORM[k], np.float32) for k in ('mean', 'std'))
  images = (rgb - mean) / std
  e = np.asarray(lowlevel.edge_scores(images, (mean, std), 8))
  y = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(lowlevel.luma_of_normalized(images, (mean, std)),
                             y, atol=2e-6)
  g = _scipy_sobel(y)
  pooled = g.reshape(2, 2, 8, 2, 8).mean((2, 4)).reshape(2, 4)
  lo, hi = pooled.min(1, keepdims=True), pooled.max(1, keepdims=True)
  np.testing.assert_allclose(e, (pooled - lo) / (hi - lo), atol=1e-4)
  assert e[0, [0, 2]].max() < e[0, [1, 3]].min() and e.max() <= 1.0
  both = lowlevel.edge_scores(images, (mean, std), 8,
                              features=('sobel', 'color_var'))
  assert both.shape == (2, 4) and float(both.min()) >= 0


@pytest.mark.parametrize('color,scale,pool', [('rgb', 1, 'mean'),
                                               ('rgb', 4, 'max'),
                                               ('luma', 2, 'mean')])
def test_colour_and_coarse_edge_scores_match_scipy(color, scale, pool):
  rng = np.random.default_rng(4)
  rgb = rng.random((2, 16, 32, 3)).astype(np.float32)
  # Equal luma, different hue: a colour edge the luma score cannot see.
  rgb[1] = 0.4
  rgb[1, :, 16:] = [0.4 + 0.114 * 0.5, 0.4, 0.4 - 0.299 * 0.5]
  mean, std = (np.asarray(NORM[k], np.float32) for k in ('mean', 'std'))
  images = (rgb - mean) / std
  e = np.asarray(lowlevel.edge_scores(images, (mean, std), 8, pool=pool,
                                      color=color, scale=scale))
  # SciPy reference: block means (s x s), then Sobel per channel, largest.
  h, w = 16 // scale, 32 // scale
  small = rgb.astype(np.float64).reshape(2, h, scale, w, scale, 3).mean(
      (2, 4))
  chans = ([small @ np.array([0.299, 0.587, 0.114])] if color == 'luma'
           else [small[..., c] for c in range(3)])
  g = np.max([_scipy_sobel(c) for c in chans], axis=0)
  p = 8 // scale
  blocks = g.reshape(2, 2, p, 4, p).transpose(0, 1, 3, 2, 4).reshape(2, 8, -1)
  pooled = blocks.mean(-1) if pool == 'mean' else blocks.max(-1)
  lo, hi = pooled.min(1, keepdims=True), pooled.max(1, keepdims=True)
  want = (pooled - lo) / (hi - lo + 1e-6)
  # Image 1: an isoluminant step between patch columns 1 and 2.
  if color == 'rgb':
    np.testing.assert_allclose(e, want, atol=1e-4)
    assert e[1, [1, 2, 5, 6]].min() > 0.99 > 0.01 > e[1, [0, 3, 4, 7]].max()
  else:   # the luma score is blind to it (min-max of rounding noise)
    np.testing.assert_allclose(e[0], want[0], atol=1e-4)
    assert np.ptp(pooled[1]) < 1e-6
  with pytest.raises(ValueError, match='edge_scale=3 must be >= 1 and divide'):
    lowlevel.edge_scores(images, (mean, std), 8, scale=3)
  with pytest.raises(ValueError, match='edge_color'):
    lowlevel.edge_scores(images, (mean, std), 8, color='hsv')


# ----------------------------------------------------------------------------
# The decisions against a NumPy re-statement.
# ----------------------------------------------------------------------------


def _np_extreme(x, members, k, iters, gap, lowest):
  if members.sum() == 0:
    return np.zeros_like(members)
  c, a = _numpy_kmeans(x[:, None], members, _numpy_init_1d(x, members, k),
                       iters)
  c = c[:, 0]
  order = np.argsort(c, kind='stable')
  pick, near = (order[0], order[1]) if lowest else (order[-1], order[-2])
  if abs(c[pick] - c[near]) < gap:
    return np.zeros_like(members)
  return members & (a == pick)


def _numpy_lvtp(probs, edge, valid, prm, frac, grid=(6, 8)):
  """One image: spec §3.2-3.3 with loops."""
  nq = len(prm.qs)
  c = probs.shape[-1]
  s = np.zeros((len(probs), nq))
  for j, q in enumerate(prm.qs):
    p = np.clip(probs, 1e-12, 1)
    if q == 1:
      s[:, j] = -(p * np.log(p)).sum(-1) / np.log(c)
    else:
      s[:, j] = (1 - (p ** q).sum(-1)) / (q - 1) / (
          (1 - c ** (1 - q)) / (q - 1))
  u = s @ _numpy_weights(s, valid, prm.weighting)
  yhat = probs.argmax(-1)
  if prm.clustering == 'sequential':
    cand = _np_extreme(u, valid, prm.k1, prm.iters, prm.gap1, True)
  elif prm.clustering == 'per_class':
    cand = np.zeros_like(valid)
    for cls in range(c):
      cand |= _np_extreme(u, valid & (yhat == cls), prm.k1, prm.iters,
                          prm.gap1, True)
  else:
    feats = np.stack([u, 1 - edge], -1)
    chosen = [int(np.flatnonzero(valid)[np.argmin((u + edge)[valid])])]
    for _ in range(prm.k_joint - 1):
      d = np.min([((feats - feats[j]) ** 2).sum(-1) for j in chosen], axis=0)
      d[~valid] = -1
      chosen.append(int(d.argmax()))
    cen, a = _numpy_kmeans(feats, valid, feats[chosen], prm.iters)
    which = int(np.argmin(cen[:, 0] + 1 - cen[:, 1]))
    gap = min(np.sqrt(((cen[j] - cen[which]) ** 2).sum())
              for j in range(len(cen)) if j != which)
    cand = valid & (a == which) if gap >= prm.gap1 else np.zeros_like(valid)
  if prm.conf_floor:
    cand &= probs.max(-1) >= prm.conf_floor
  exits = cand.copy()
  if prm.passes == 2:
    x = u if prm.clustering == 'joint' else edge
    exits &= ~_np_extreme(x, cand, prm.k2, prm.iters, prm.gap2, False)
  if prm.keep_topk_per_class:
    for cls in range(c):
      idx = np.flatnonzero(exits & (yhat == cls))
      keep = idx[np.argsort(u[idx], kind='stable')[:prm.keep_topk_per_class]]
      exits[keep] = False
  if prm.label_boundary:
    h, w = grid
    r = prm.label_boundary // 2
    cls = np.where(valid, yhat, -1).reshape(h, w)
    for n in np.flatnonzero(exits):
      y, x = divmod(n, w)
      window = cls[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]
      if len(set(window[window >= 0].tolist())) > 1:
        exits[n] = False
  if frac < 1:
    budget = int(np.floor(frac * valid.sum()))
    idx = np.flatnonzero(exits)
    exits[idx[np.argsort(u[idx], kind='stable')[budget:]]] = False
  return exits


_ABLATIONS = [
    dict(),
    dict(passes=1),
    dict(clustering='per_class'),
    dict(clustering='joint'),
    dict(clustering='joint', passes=1),
    dict(weighting='ewm', k1=3),
    dict(weighting='uniform', qs=(0.5, 2.0, 3.0)),
    dict(weighting='single', qs=(2.0,), conf_floor=0.6),
    dict(keep_topk_per_class=2, max_exit_frac=(0.3,)),
    dict(label_boundary=3),
    dict(label_boundary=5, passes=1),
]


def _lvtp_params(**overrides):
  cfg = registry.get('lvtp').config_defaults()
  cfg.update(overrides)
  return registry.get('lvtp').make_params(cfg, 2)


@pytest.mark.parametrize('overrides', _ABLATIONS)
def test_decisions_match_numpy_restatement(overrides):
  rng = np.random.default_rng(len(str(overrides)))
  b, kp, c = 4, 48, 4
  # A bimodal mix of easy (sharp) and hard (flat) tokens.
  sharp = rng.random((b, kp, 1)) < 0.6
  probs = np.where(sharp, _random_probs(rng, (b, kp, c), 6.0),
                   _random_probs(rng, (b, kp, c), 0.7))
  # Spatially coherent predictions: the argmax is the quadrant of the 6x8
  # grid, so predicted class boundaries are lines (label_boundary).
  yy, xx = np.divmod(np.arange(kp), 8)
  region = (xx >= 4) + 2 * (yy >= 3)
  shift = region - probs.argmax(-1)
  probs = np.stack([np.roll(probs[i, j], shift[i, j]) for i in range(b)
                    for j in range(kp)]).reshape(b, kp, c)
  edge = rng.random((b, kp)) ** 2
  valid = rng.random((b, kp)) < 0.85
  prm = _lvtp_params(**overrides)
  ctx = registry.StageContext(
      stage=0, layer=1, grid=(6, 8), valid=jnp.asarray(valid),
      src=jnp.broadcast_to(jnp.arange(kp), (b, kp)), signals={})
  decide = jax.jit(lvtp.exit_decisions, static_argnums=3)
  got = np.asarray(decide(probs.astype(np.float32), edge.astype(np.float32),
                          ctx, prm))
  for i in range(b):
    want = _numpy_lvtp(probs[i], edge[i], valid[i], prm,
                       prm.max_exit_frac[0])
    np.testing.assert_array_equal(got[i], want, err_msg=f'image {i}')
  assert got.any() and not (got & ~valid).all()
  assert not (got & ~valid).any()
  if prm.label_boundary:   # the guard changed something
    plain = _lvtp_params(**dict(overrides, label_boundary=0))
    assert (np.asarray(decide(probs.astype(np.float32),
                              edge.astype(np.float32), ctx, plain)) & ~got
            ).any()


def test_edge_rescue_keeps_edge_tokens():
  # Every token is easy; the edge pass rescues the high-edge half.
  b, kp, c = 1, 16, 3
  probs = np.tile(np.array([0.98, 0.01, 0.01], np.float32), (b, kp, 1))
  probs[:, ::2] = [0.6, 0.3, 0.1]      # uncertain: stay for pass 1
  edge = np.tile(np.array([0.0, 0.0, 0.0, 1.0], np.float32), (b, kp // 4))
  ctx = registry.StageContext(stage=0, layer=1, grid=(4, 4),
                              valid=jnp.ones((b, kp), bool),
                              src=jnp.arange(kp)[None], signals={})
  two = np.asarray(lvtp.exit_decisions(probs, edge, ctx, _lvtp_params()))
  one = np.asarray(lvtp.exit_decisions(probs, edge, ctx,
                                       _lvtp_params(passes=1)))
  easy = np.arange(kp) % 2 == 1
  np.testing.assert_array_equal(one[0], easy)
  np.testing.assert_array_equal(two[0], easy & (edge[0] < 0.5))


def test_config_defaults_and_errors():
  cfg = pruning.config_defaults()
  assert cfg.lvtp.qs == (0.5, 1.0, 2.0) and cfg.lvtp.weighting == 'dispersion'
  assert cfg.lvtp.clustering == 'sequential' and cfg.lvtp.passes == 2
  assert (cfg.lvtp.k1, cfg.lvtp.k2, cfg.lvtp.iters) == (2, 2, 10)
  assert cfg.lvtp.gap1 == cfg.lvtp.gap2 == 0.05
  assert cfg.lvtp.keep_topk_per_class == 0 and cfg.lvtp.max_exit_frac == (1.0,)
  model = tiny.model()
  with pytest.raises(ValueError, match='needs the image normalisation'):
    pruning.attach(model, dict(name='lvtp'))
  spec = pruning.build_spec(dict(name='lvtp'), model, NORM)
  assert spec.normalization == (NORM['mean'], NORM['std'])
  assert spec.reassemble == 'frozen'
  assert pruning.build_spec(dict(name='lvtp', lvtp=dict(
      pruned_fill='interpolate')), model, NORM).reassemble == 'interpolate'
  for bad, match in [
      (dict(qs=()), r'lvtp.qs=\(\)'), (dict(qs=(0.0,)), 'q > 0'),
      (dict(weighting='max'), 'weighting'),
      (dict(weighting='single'), "'single' uses one entropy"),
      (dict(clustering='dbscan'), 'clustering'), (dict(passes=3), 'passes'),
      (dict(k1=1), 'at least 2 clusters'), (dict(iters=0), 'iters'),
      (dict(gap1=-0.1), 'gap1'), (dict(conf_floor=1.5), 'conf_floor'),
      (dict(edge_pool='median'), 'edge_pool'),
      (dict(edge_color='lab'), 'edge_color'),
      (dict(edge_scale=0), 'edge_scale'),
      (dict(lowlevel=('hog',)), 'lowlevel'),
      (dict(spatial_scales=(2,)), 'spatial_scales'),
      (dict(max_exit_frac=(0.5, 0.5, 0.5)), 'one per stage boundary'),
      (dict(max_exit_frac=(1.5,)), 'max_exit_frac'),
      (dict(pruned_fill='zero'), 'pruned_fill'),
      (dict(keep_topk_per_class=-1), 'keep_topk_per_class'),
      (dict(label_boundary=2), 'label_boundary'),
      (dict(label_boundary=1), 'label_boundary')]:
    with pytest.raises(ValueError, match=match):
      pruning.build_spec(dict(name='lvtp', lvtp=bad), model, NORM)
  with pytest.raises(ValueError, match='normalization'):
    pruning.build_spec(dict(name='lvtp'), model, dict(mean=(0,), std=(1,)))


# ----------------------------------------------------------------------------
# In the engine.
# ----------------------------------------------------------------------------

MODEL = tiny.model()
PARAMS = tiny.random_params(MODEL, scale=0.5)
MASK_MODEL = tiny.model(decoder='mask_transformer',
                        aux_head='mask_transformer')
MASK_PARAMS = tiny.random_params(MASK_MODEL, scale=0.5)


def _structured_images(seed, batch=tiny.B):
  """Flat regions with a few edges, so the edge scores have structure."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, tiny.HW, tiny.HW, 3), np.float32)
  for i in range(batch):
    x[i] = rng.random(3)
    x[i, rng.integers(4, 28):, rng.integers(4, 28):] = rng.random(3)
    x[i, :, rng.integers(0, 32)] = 1.0
  x += rng.normal(0, 0.02, x.shape)
  return jnp.asarray((x - 0.5) / 0.5)


def _apply(model, params, cfg, x, norm=dict(mean=(0.5,) * 3, std=(0.5,) * 3)):
  pruned = pruning.attach(model, cfg, normalization=norm)
  return jax.jit(lambda p, x: pruned.apply({'params': p}, x,
                                           return_aux=True))(params, x)


@pytest.mark.parametrize('mask,lb', [(False, 0), (True, 0), (False, 3)])
def test_buffer_matches_masked_oracle(mask, lb):
  model, params = (MASK_MODEL, MASK_PARAMS) if mask else (MODEL, PARAMS)
  x = _structured_images(0)
  cfg = dict(name='lvtp', lvtp=dict(gap1=0.0, gap2=0.0, label_boundary=lb))
  logits, aux = _apply(model, params, cfg, x)
  stage = np.asarray(aux['exit_stage'])
  assert (stage == 0).any() and (stage == 2).any()
  # Capacities that just fit every image: no overflow, same decisions.
  active = np.asarray(aux['tokens_per_block'])[:, list(tiny.AUX)]
  caps = tuple(float(v) for v in active.max(0) / tiny.N)
  buf_logits, buf = _apply(model, params, dict(cfg, mode='buffer',
                                               capacities=caps), x)
  np.testing.assert_array_equal(buf['overflow'], 0)
  np.testing.assert_array_equal(buf['exit_stage'], stage)
  np.testing.assert_allclose(buf['token_logits'], aux['token_logits'],
                             atol=2e-5)
  np.testing.assert_allclose(buf_logits, logits, atol=2e-5)


def test_all_tokens_exit_and_outputs_stay_finite():
  # A head with zero weights gives every token the same distribution: one
  # k-means cluster holds them all, and with gap1 = 0 all of them exit.
  params = jax.tree.map(lambda a: a, PARAMS)
  head = dict(params['aux_head_1']['decoder']['head'])
  head['kernel'] = jnp.zeros_like(head['kernel'])
  params['aux_head_1'] = dict(params['aux_head_1'],
                              decoder=dict(head=head))
  cfg = dict(name='lvtp', mode='buffer', capacities=(0.25,),
             lvtp=dict(gap1=0.0, passes=1))
  logits, aux = _apply(MODEL, params, cfg, _structured_images(1))
  np.testing.assert_array_equal(aux['exit_stage'], 0)
  np.testing.assert_array_equal(aux['tokens_per_block'][:, 1:], 0)
  assert np.isfinite(logits).all() and np.isfinite(aux['token_logits']).all()


def test_no_retracing_and_edge_scores_per_forward():
  pruned = pruning.attach(MODEL, dict(name='lvtp', mode='buffer',
                                      capacities=(0.75, 0.5)),
                          normalization=dict(mean=(0.5,) * 3,
                                             std=(0.5,) * 3))
  fwd = jax.jit(lambda p, x: pruned.apply({'params': p}, x, return_aux=True))
  shapes = jax.eval_shape(fwd, PARAMS, _structured_images(0))
  for seed in range(3):
    out = fwd(PARAMS, _structured_images(seed))
    assert jax.tree.map(lambda a: a.shape, out) == jax.tree.map(
        lambda a: a.shape, shapes)
  assert fwd._cache_size() == 1  # pylint: disable=protected-access


def test_spatial_scale_and_interpolated_fill_run():
  x = _structured_images(2)
  cfg = dict(name='lvtp', lvtp=dict(spatial_scales=(1, 3), gap1=0.0,
                                    pruned_fill='interpolate'))
  logits, aux = _apply(MODEL, PARAMS, cfg, x)
  stage = np.asarray(aux['exit_stage'])
  assert (stage < 2).any() and np.isfinite(logits).all()
  # Exited patches carry the decoder logits of a patch that stayed.
  tok = np.asarray(aux['token_logits'])
  for i in range(tiny.B):
    stayed = tok[i][stage[i] == 2]
    for row in tok[i][stage[i] < 2]:
      assert (np.abs(stayed - row).max(-1) == 0).any()


def test_final_head_on_intermediate_tokens():
  """aux_source='final_head_on_intermediate': the boundary logits are the
  final decoder on the block-k tokens, i.e. a Segmenter cut after block k."""
  model = tiny.model(aux_layers=())
  params = tiny.random_params(model)
  x = tiny.images(4)
  cfg = dict(name='dtop', aux_source='final_head_on_intermediate',
             layers=(1, 2), dtop=dict(threshold=1.0))
  with pytest.raises(ValueError, match='no aux_layers'):
    pruning.attach(model, dict(name='dtop'))
  _, aux = _apply(model, params, cfg, x)
  for k in (1, 2):
    cut = tiny.model(aux_layers=(), depth=k)
    cut_params = dict(params, encoder={
        name: v for name, v in params['encoder'].items()
        if not name.startswith('blocks_') or int(name[7:]) < k})
    _, want = cut.apply({'params': cut_params}, x, return_aux=True)
    np.testing.assert_allclose(aux['aux_logits'][k], want['token_logits'],
                               atol=1e-5)
  with pytest.raises(ValueError, match='needs config.pruning.layers'):
    pruning.attach(model, dict(cfg, layers=()))
  with pytest.raises(ValueError, match='needs config.pruning.layers'):
    pruning.attach(model, dict(cfg, layers=(3,)))
  # With LVTP it prunes a model that never had auxiliary heads.
  logits, aux = _apply(model, params, dict(
      name='lvtp', aux_source='final_head_on_intermediate', layers=(1, 2),
      lvtp=dict(gap1=0.0)), _structured_images(3))
  assert (np.asarray(aux['exit_stage']) < 2).any()
  assert np.isfinite(logits).all()


def test_segmenter_model_is_unchanged_by_attach():
  pruned = pruning.attach(MODEL, ml_collections.ConfigDict(
      dict(name='lvtp')), normalization=NORM)
  assert isinstance(pruned, seg_lib.Segmenter) and MODEL.pruning is None
  assert pruned.pruning.name == 'lvtp'
