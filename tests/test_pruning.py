"""Pruning framework and DToP: oracle vs buffer, decisions, FLOPs, training.

Tiny Segmenters on the CPU with auxiliary heads after blocks 1 and 2: MODEL
(linear decoder and heads) and MASK_MODEL (mask-transformer decoder, whose
attention must ignore exited patches; the mask-transformer auxiliary head
has its own test). The masked mode is the
oracle the buffer mode is checked against; DToP's decisions are checked
against a plain NumPy re-statement of ../shared/specs/dtop.md §3 steps 3-5.
Every pruning setting is a separate XLA compilation (seconds on the CPU),
so the tests share compiled forwards (`_forward`).
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lvtp_jax import pruning
from lvtp_jax.measure import flops
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.pruning import engine
from lvtp_jax.pruning import ranking
from lvtp_jax.pruning import registry
from lvtp_jax.pruning.policies import dtop
from lvtp_jax.pruning.policies import random_exit
from lvtp_jax.tokens import state as ts
from tests import tiny_segmenter as tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, HW, N, AUX, B = tiny.C, tiny.HW, tiny.N, tiny.AUX, tiny.B
_model = tiny.model
_params = tiny.random_params
_images = tiny.images
MODEL = _model()
PARAMS = _params(MODEL)
MASK_MODEL = _model(decoder='mask_transformer')
MASK_PARAMS = _params(MASK_MODEL)
_FORWARDS = {}


def _forward(cfg=None, model=MODEL):
  """The jitted forward of `model` with config.pruning `cfg` (cached)."""
  pruned = pruning.attach(model, cfg) if cfg is not None else model
  key = repr(pruned)  # every field, the pruning spec included
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(lambda p, x: pruned.apply(
        {'params': p}, x, return_aux=True))
  return _FORWARDS[key]


def _run(images, cfg=None, mask=False):
  if mask:
    return _forward(cfg, MASK_MODEL)(MASK_PARAMS, images)
  return _forward(cfg)(PARAMS, images)


def _dtop(threshold, top_k=5, **kw):
  return dict(name='dtop', dtop=dict(threshold=threshold, top_k=top_k), **kw)


def _median_conf(images):
  """A DToP threshold at which about half the first-stage patches qualify."""
  _, aux = _run(images)
  return float(np.median(engine.confidence(aux['aux_logits'][AUX[0]])))


# ----------------------------------------------------------------------------
# Oracle vs buffer, exactness, extremes.
# ----------------------------------------------------------------------------


def test_threshold_one_reproduces_the_unpruned_model():
  x = _images(1)
  want, want_aux = _run(x)
  logits, aux = _run(x, _dtop(1.0))
  # Per-token outputs are bit-identical. The upsampled map may differ in the
  # last bit: XLA fuses the unpruned model's resize with the decoder's final
  # LayerNorm, the pruned one's with the reassembly select.
  np.testing.assert_array_equal(aux['token_logits'], want_aux['token_logits'])
  for k in AUX:
    np.testing.assert_array_equal(aux['aux_logits'][k],
                                  want_aux['aux_logits'][k])
  np.testing.assert_allclose(logits, want, rtol=0, atol=2e-6)
  np.testing.assert_array_equal(aux['exit_stage'], len(AUX))
  np.testing.assert_array_equal(aux['tokens_per_block'], N)
  np.testing.assert_array_equal(aux['valid_tokens'], want_aux['valid_tokens'])
  np.testing.assert_array_equal(aux['overflow'], np.zeros((B, len(AUX))))


def test_masked_and_buffer_agree_when_nothing_overflows():
  x = _images(2)
  cfg = _dtop(_median_conf(x), top_k=1)
  oracle, oracle_aux = _run(x, cfg)
  tokens = np.asarray(oracle_aux['tokens_per_block'])
  assert tokens[:, -1].max() < N  # something exited
  # The smallest capacities that hold every image's active patches.
  capacities = tuple(max(tokens[:, k].max(), 1) / N for k in AUX)
  assert min(capacities) < 1
  logits, aux = _run(x, dict(cfg, mode='buffer', capacities=capacities))
  np.testing.assert_array_equal(aux['overflow'], 0)
  np.testing.assert_array_equal(aux['exit_stage'], oracle_aux['exit_stage'])
  np.testing.assert_array_equal(aux['tokens_per_block'], tokens)
  np.testing.assert_allclose(aux['token_logits'], oracle_aux['token_logits'],
                             atol=1e-5)
  np.testing.assert_allclose(logits, oracle, atol=1e-5)
  for k in AUX:
    np.testing.assert_allclose(aux['aux_logits'][k],
                               oracle_aux['aux_logits'][k], atol=1e-5)


def test_everything_exits_at_the_first_stage():
  x = _images(3)
  # Buffer mode: the later blocks and the decoder run on padding only.
  cfg = _dtop(0.0, top_k=0, mode='buffer', capacities=(0.25,))
  logits, aux = _run(x, cfg)
  np.testing.assert_array_equal(aux['exit_stage'], 0)
  np.testing.assert_array_equal(aux['tokens_per_block'][:, :AUX[0]], N)
  np.testing.assert_array_equal(aux['tokens_per_block'][:, AUX[0]:], 0)
  np.testing.assert_array_equal(aux['overflow'], 0)
  assert np.isfinite(logits).all()
  # Every patch shows the prediction of the head it exited at (no NaN from
  # the decoder running on a buffer without a valid patch).
  np.testing.assert_array_equal(aux['token_logits'], aux['aux_logits'][AUX[0]])
  np.testing.assert_array_equal(aux['aux_logits'][AUX[1]],
                                aux['aux_logits'][AUX[0]])


def test_mask_transformer_head_ignores_invalid_keys():
  head = seg_lib.AuxHead(C, 'mask_transformer')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  params = {'params': _params(head, x.shape)}
  valid = jnp.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  apply = jax.jit(head.apply)
  masked = apply(params, x, valid=valid)
  # Other features in the invalid slots change nothing for the valid ones.
  other = apply(params, jnp.where(valid[..., None], x, 3.0 - x), valid=valid)
  np.testing.assert_allclose(masked[0, valid[0]], other[0, valid[0]],
                             atol=1e-6)
  assert np.abs(masked[0, ~valid[0]] - other[0, ~valid[0]]).max() > 1e-3
  assert np.isfinite(masked).all()  # no patch valid: the class tokens remain


def test_reassembly():
  rng = np.random.default_rng(0)
  dec = rng.normal(size=(1, 3, C)).astype(np.float32)   # 3 patch slots
  canvas = rng.normal(size=(1, 4, C)).astype(np.float32)
  src = np.array([[3, -1, 1, -1]])   # slots, after one prefix slot
  every = jax.jit(lambda *a: [engine.reassemble(*a, 1, how, (2, 2))
                              for how in pruning.REASSEMBLE])
  out, frozen, interpolated = map(np.asarray, every(dec, src, canvas))
  want = np.stack([dec[0, 2], canvas[0, 1], dec[0, 0], canvas[0, 3]])
  np.testing.assert_array_equal(out[0], want)
  # 'frozen': the canvas holds log-probabilities, stayed patches get the
  # decoder's log-softmax: the token map mixes probabilities.
  probs = np.exp(want - want.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(frozen[0][[0, 2]]), probs[[0, 2]],
                             rtol=1e-5)
  np.testing.assert_array_equal(frozen[0][[1, 3]], canvas[0, [1, 3]])
  # 'interpolate': on the 2 x 2 grid patches 0 and 2 stayed; patch 1 (0, 1)
  # is next to patch 0 (distance 1, patch 2 is at sqrt 2), patch 3 (1, 1)
  # next to patch 2.
  np.testing.assert_array_equal(
      interpolated[0], dec[0, [2, 2, 0, 0]])
  nothing_stayed = engine.reassemble(dec, np.full((1, 4), -1), canvas, 1,
                                     'interpolate', (2, 2))
  np.testing.assert_array_equal(nothing_stayed, canvas)


# ----------------------------------------------------------------------------
# Overflow.
# ----------------------------------------------------------------------------


def test_overflow_is_counted_and_follows_the_rule():
  x = _images(5)
  # No policy exits (p0 = 1): everything beyond the capacity is overflow.
  cfg = _dtop(1.0, mode='buffer', capacities=(0.5, 0.25))
  logits, aux = _run(x, cfg)
  keep0, keep1 = N // 2, N // 4
  np.testing.assert_array_equal(aux['overflow'],
                                [[N - keep0, keep0 - keep1]] * B)
  stage = np.asarray(aux['exit_stage'])
  np.testing.assert_array_equal((stage == 0).sum(1), N - keep0)
  np.testing.assert_array_equal((stage == 2).sum(1), keep1)
  np.testing.assert_array_equal(aux['tokens_per_block'],
                                [[N, keep0, keep1]] * B)
  assert np.isfinite(logits).all()
  for s, k in enumerate(AUX):
    conf = np.asarray(engine.confidence(aux['aux_logits'][k]))
    for b in range(B):
      # 'exit_confident': the surplus the head is most confident about.
      forced, stayed = stage[b] == s, stage[b] > s
      assert conf[b][forced].min() >= conf[b][stayed].max()
  # Forced patches keep the prediction of the boundary they left at.
  exited = stage < len(AUX)
  canvas = np.where((stage == 0)[..., None], aux['aux_logits'][AUX[0]],
                    aux['aux_logits'][AUX[1]])
  np.testing.assert_array_equal(np.asarray(aux['token_logits'])[exited],
                                canvas[exited])


def test_overflow_rules_with_ties():
  remaining = np.array([[1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 1, 0]], bool)
  conf = np.array([[0.9, 0.7, 0.1, 0.5, 0.7, 0.2], [0.1] * 6], np.float32)
  rules = jax.jit(lambda r, c: [engine.overflow_exits(r, c, 3, rule)
                                for rule in pruning.OVERFLOW_RULES])
  confident, last = rules(remaining, conf)
  # Stay: the 3 least confident; of the two 0.7s the later one exits.
  np.testing.assert_array_equal(confident, [[1, 0, 0, 0, 1, 0], [0] * 6])
  np.testing.assert_array_equal(last, [[0, 0, 0, 0, 1, 1], [0] * 6])


# ----------------------------------------------------------------------------
# DToP decisions against a NumPy re-statement of spec §3 steps 3-5.
# ----------------------------------------------------------------------------


def _numpy_dtop(logits, valid, p0, k):
  z = logits.astype(np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  conf, yhat = probs.max(-1), probs.argmax(-1)
  exits = np.zeros(valid.shape, bool)
  for b in range(valid.shape[0]):
    cand = [n for n in range(valid.shape[1]) if valid[b, n] and conf[b, n] > p0]
    exits[b, cand] = True
    for c in set(yhat[b, cand]):
      members = sorted((n for n in cand if yhat[b, n] == c),
                       key=lambda n: (-conf[b, n], n))
      exits[b, members[:k]] = False
  return exits, conf


@pytest.mark.parametrize('k', [0, 1, 2, 5, 100])
def test_dtop_decisions_match_numpy_restatement(k):
  rng = np.random.default_rng(k)
  b, kp, c = 4, 40, 4
  # Half-integer logits: many exact ties in confidence and in the argmax.
  logits = np.round(rng.normal(0, 1.5, (b, kp, c)) * 2) / 2
  logits[:, 5:10] = logits[:, :1]  # identical rows: equal confidences
  valid = rng.random((b, kp)) < 0.8
  _, conf = _numpy_dtop(logits, valid, 0.0, 0)
  levels = np.unique(conf)
  mid = (levels[len(levels) // 4] + levels[len(levels) // 4 + 1]) / 2
  decide = jax.jit(dtop.exit_decisions, static_argnums=3)
  for p0 in (mid, 0.0):
    want, _ = _numpy_dtop(logits, valid, p0, k)
    got = decide(logits.astype(np.float32), valid, p0, k)
    np.testing.assert_array_equal(got, want, err_msg=f'p0={p0}')
    assert not (want & ~valid).any()
    if k <= 2:
      assert want.any()
    if k == 100:
      assert not want.any()


# ----------------------------------------------------------------------------
# Static shapes, FLOPs.
# ----------------------------------------------------------------------------


def test_no_retracing_and_static_shapes():
  cfg = _dtop(1.0, mode='buffer', capacities=(0.5, 0.25),
              overflow='exit_confident')
  fwd = _forward(cfg)
  shapes = jax.eval_shape(fwd, PARAMS, _images(0))  # no concrete values
  for seed in range(3):
    out = fwd(PARAMS, _images(seed))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == jax.tree.map(
        lambda a: (a.shape, a.dtype), shapes)
  assert fwd._cache_size() == 1  # pylint: disable=protected-access
  _, aux = shapes
  assert aux['exit_stage'].shape == (B, N)
  assert aux['tokens_per_block'].shape == (B, MODEL.depth)
  assert aux['overflow'].shape == (B, len(AUX))
  assert aux['token_logits'].shape == (B, N, C)
  # The encoder really runs on smaller buffers: XLA counts fewer FLOPs (on
  # the lowered program; compiling it again would only cost time).
  def count(f):
    return flops.lowered_flops(f.lower(PARAMS, _images(0)))

  assert count(fwd) < 0.8 * count(_forward()), (count(fwd), count(_forward()))


def test_effective_macs():
  x = _images(2)
  _, aux = _run(x, _dtop(1.0))
  full = pruning.effective_macs(MODEL, aux['tokens_per_block'])
  np.testing.assert_allclose(full, flops.segmenter_macs(MODEL, (HW, HW)),
                             rtol=1e-12)
  _, aux = _run(x, _dtop(_median_conf(x), top_k=1))
  pruned = pruning.effective_macs(MODEL, aux['tokens_per_block'])
  assert pruned.shape == (B,) and (pruned < full).all()
  # Hand count for one image: blocks on prefix + valid patches, aux head k on
  # block k's patches, the decoder on the last block's patches.
  t = np.asarray(aux['tokens_per_block'][0], np.float64)
  d = MODEL.width
  want = (N * 3 * 64 * d + flops.block_macs(t + 1, d, 64).sum()
          + (t[0] + t[1] + t[2]) * d * C)
  np.testing.assert_allclose(pruned[0], want, rtol=1e-12)
  # The mask decoder on n patches: its projections and a block over the
  # n patches plus the C class embeddings.
  full = pruning.effective_macs(MASK_MODEL, np.full((2, 3), N))
  np.testing.assert_allclose(full, flops.segmenter_macs(MASK_MODEL, (HW, HW)))
  t = np.array([N, 7, 3])
  mask_head = lambda n, depth: (2 * n * d * d + C * d * d + n * C * d
                                + depth * flops.block_macs(n + C, d, 4 * d))
  want = (N * 3 * 64 * d + flops.block_macs(t + 1, d, 64).sum()
          + (N + 7) * d * C + mask_head(3, 1))
  np.testing.assert_allclose(pruning.effective_macs(MASK_MODEL, t), want)


# ----------------------------------------------------------------------------
# Config and registry.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Exit summaries (config.pruning.exit_summary='per_class').
# ----------------------------------------------------------------------------


def _state(x, size=None):
  state = ts.init_state(jnp.asarray(x), 1)
  return state if size is None else state.replace(size=jnp.asarray(size))


def test_summarize_exits_matches_numpy():
  rng = np.random.default_rng(0)
  b, p, kp, c, d = 3, 1, 12, 4, 6
  x = rng.normal(size=(b, p + kp, d)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, p + kp)).astype(np.float32)
  logits = rng.normal(size=(b, kp, c)).astype(np.float32)
  logits[0, 3] = logits[0, 5]          # a confidence tie: the lower slot
  exits = rng.random((b, kp)) < 0.6
  exits[0, [3, 5]] = True
  state = _state(x, size)
  new, carriers = jax.jit(engine.summarize_exits, static_argnums=3)(
      state, jnp.asarray(exits), jnp.asarray(logits), p)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want_x, want_size = x.copy(), size.copy()
  want_carriers = np.zeros((b, kp), bool)
  for i in range(b):
    for cls in range(c):
      members = np.flatnonzero(exits[i] & (probs[i].argmax(-1) == cls))
      if not len(members):
        continue
      conf = probs[i, members].max(-1)
      carrier = members[np.flatnonzero(conf == conf.max())[0]]
      want_carriers[i, carrier] = True
      w = size[i, p + members]
      want_x[i, p + carrier] = (w[:, None] * x[i, p + members]).sum(0) / w.sum()
      want_size[i, p + carrier] = w.sum()
  assert want_carriers[0, 3] or not exits[0, 3]
  np.testing.assert_array_equal(carriers, want_carriers)
  np.testing.assert_allclose(new.x, want_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new.size, want_size)
  np.testing.assert_array_equal(new.valid, state.valid)


def test_a_summary_of_identical_tokens_is_exact():
  # m identical tokens merged into one slot of size m, with proportional
  # attention, give every other token exactly what the m copies gave it.
  from lvtp_jax.models import vit  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  b, k, d, m = 2, 10, 16, 4
  x = rng.normal(size=(b, k, d)).astype(np.float32)
  x[:, 2:2 + m] = x[:, 2:3]            # slots 2..5 are copies
  block = vit.Block(num_heads=2, mlp_dim=32)
  params = block.init(jax.random.PRNGKey(0), _state(x))
  full, _ = block.apply(params, _state(x))
  logits = np.zeros((b, k - 1, 3), np.float32)
  logits[:, 1:1 + m, 0] = 5.0          # the copies: class 0, patch slots 1..4
  exits = np.zeros((b, k - 1), bool)
  exits[:, 1:1 + m] = True
  summary, carriers = engine.summarize_exits(
      _state(x), jnp.asarray(exits), jnp.asarray(logits), 1)
  np.testing.assert_array_equal(np.flatnonzero(carriers[0]), [1])
  keep = np.ones((b, k), bool)
  keep[:, 3:2 + m] = False             # the copies other than the carrier
  summary = summary.replace(valid=jnp.asarray(keep))
  out, _ = block.apply(params, summary, masked=True, proportional=True)
  np.testing.assert_allclose(np.asarray(out.x)[keep],
                             np.asarray(full.x)[keep], rtol=1e-5, atol=1e-5)
  # Without the log-size term the copies' weight is lost.
  plain, _ = block.apply(params, summary, masked=True)
  assert np.abs(np.asarray(plain.x)[keep] - np.asarray(full.x)[keep]).max() \
      > 1e-3


@pytest.mark.parametrize('mask', [False, True])
def test_exit_summaries_in_the_engine(mask):
  x = _images(2)
  base = _dtop(_median_conf(x), top_k=1)
  _, plain = _run(x, base, mask=mask)
  cfg = dict(base, exit_summary='per_class')
  oracle, aux = _run(x, cfg, mask=mask)
  # The same first-stage decisions (later ones see the summaries); every
  # exiting class of an image leaves one slot behind, and the effective-FLOP
  # token counts include the summary slots.
  stage = np.asarray(aux['exit_stage'])
  np.testing.assert_array_equal(stage == 0,
                                np.asarray(plain['exit_stage']) == 0)
  first = np.asarray(plain['aux_logits'][AUX[0]]).argmax(-1)
  for i in range(B):
    classes = len(set(first[i][stage[i] == 0].tolist()))
    assert classes > 0
    assert (aux['tokens_per_block'][i, AUX[0]] ==
            plain['tokens_per_block'][i, AUX[0]] + classes)
  assert not np.allclose(aux['token_logits'], plain['token_logits'])
  # Exited patches keep the canvas prediction; buffer mode gives the same
  # result when the capacities hold the patches and the summaries.
  np.testing.assert_array_equal(
      np.asarray(aux['token_logits'])[stage == 0],
      np.asarray(aux['aux_logits'][AUX[0]])[stage == 0])
  tokens = np.asarray(aux['tokens_per_block'])
  capacities = tuple(max(tokens[:, k].max(), 1) / N for k in AUX)
  logits, buf = _run(x, dict(cfg, mode='buffer', capacities=capacities),
                     mask=mask)
  np.testing.assert_array_equal(buf['overflow'], 0)
  np.testing.assert_array_equal(buf['exit_stage'], stage)
  np.testing.assert_array_equal(buf['tokens_per_block'], tokens)
  np.testing.assert_allclose(buf['token_logits'], aux['token_logits'],
                             atol=2e-5)
  np.testing.assert_allclose(logits, oracle, atol=2e-5)
  # A capacity below patches + summaries: the summaries stay, patches
  # overflow (counted), and the buffer never holds more than its capacity.
  small = tuple(max(c - 2 / N, 1 / N) for c in capacities)
  _, tight = _run(x, dict(cfg, mode='buffer', capacities=small), mask=mask)
  assert np.asarray(tight['overflow']).sum() > 0
  for s, k in enumerate(AUX):
    assert (np.asarray(tight['tokens_per_block'])[:, k] <=
            math.ceil(round(small[s] * N, 6))).all()


def test_gradients_flow_through_exit_summaries():
  # Phase-2 training with summaries: the merge is differentiable, so the
  # blocks after a boundary send gradient into the exited patches' features.
  x = _images(4)
  cfg = dict(_dtop(_median_conf(x), top_k=1), exit_summary='per_class',
             mode='buffer', capacities=(0.75,))
  pruned = pruning.attach(MODEL, cfg)

  def loss(p):
    logits, aux = pruned.apply({'params': p}, x, return_aux=True)
    return jnp.mean(logits ** 2) + sum(jnp.mean(v ** 2) for v in
                                       aux['aux_logits'].values())

  grads = jax.jit(jax.grad(loss))(PARAMS)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  last = grads['encoder']['blocks_2']
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(last))


def test_config_defaults_and_spec():
  cfg = pruning.config_defaults()
  assert cfg.name == 'none' and cfg.mode == 'masked'
  assert cfg.overflow == 'exit_confident' and cfg.capacities == ()
  assert cfg.dtop.threshold == 0.9 and cfg.dtop.top_k == 5
  assert cfg.dtop.reassemble == 'logits'
  assert {'none', 'random', 'dtop'} <= set(pruning.names())
  assert pruning.attach(MODEL, None).pruning is None
  assert pruning.attach(MODEL, cfg).pruning is None
  spec = pruning.build_spec(ml_collections.ConfigDict(
      dict(name='dtop', mode='buffer', capacities=(0.5,))), MODEL)
  assert spec.capacities == (0.5, 0.5) and spec.exit_layers == AUX
  assert hash(spec) == hash(pruning.build_spec(dict(
      name='dtop', mode='buffer', capacities=[0.5, 0.5]), MODEL))
  assert spec.capacity(1, 10) == 5 and spec.capacity(0, 7) == 4
  assert pruning.build_spec(dict(name='dtop', layers=(2,)),
                            MODEL).exit_layers == (2,)


@pytest.mark.parametrize('cfg, match', [
    (dict(name='nope'), r"'nope' is not a known pruning policy; known: .*dtop"),
    (dict(name='dtop', mode='ragged'), r'config.pruning.mode'),
    (dict(name='none', mode='ragged'), r'config.pruning.mode'),
    (dict(name='dtop', overflow='drop'), r'config.pruning.overflow'),
    (dict(name='dtop', dtop=dict(threshold=1.5)),
     r'config.pruning.dtop.threshold=1.5 must lie in \[0, 1\]'),
    (dict(name='dtop', dtop=dict(threshold=-0.1)), r'threshold'),
    (dict(name='dtop', dtop=dict(top_k=-1)), r'config.pruning.dtop.top_k'),
    (dict(name='dtop', dtop=dict(reassemble='mean')),
     r'config.pruning.dtop.reassemble'),
    (dict(name='dtop', dtop=dict(top_k=0.5)), r'dtop.top_k=0.5 has the wrong'),
    (dict(name='dtop', capacities=(0.5, 1.5)), r'capacities.*\(0, 1\]'),
    (dict(name='dtop', capacities=(0.0,)), r'capacities.*\(0, 1\]'),
    (dict(name='dtop', capacities=(0.25, 0.5)), r'must not increase'),
    (dict(name='dtop', capacities=(0.5, 0.5, 0.5)), r'one per stage boundary'),
    (dict(name='dtop', layers=(3,)), r'config.pruning.layers=\(3,\)'),
    (dict(name='dtop', dtopp=dict()), r'config.pruning.dtopp is not'),
    (dict(name='random', random=dict(exit_fraction=(2.0,))),
     r'config.pruning.random.exit_fraction'),
    (dict(name='dtop', exit_summary='mean'), r'config.pruning.exit_summary'),
])
def test_config_errors_name_the_field(cfg, match):
  with pytest.raises(ValueError, match=match):
    pruning.attach(MODEL, cfg)


def test_exits_need_auxiliary_heads():
  model = _model(aux_layers=())
  with pytest.raises(ValueError,
                     match='no aux_layers.*config.model.aux_layers'):
    pruning.attach(model, dict(name='dtop'))
  assert pruning.attach(model, dict(name='none')).pruning is None
  spec = pruning.build_spec(dict(name='dtop'), MODEL)
  with pytest.raises(ValueError, match='rebuild it'):
    jax.eval_shape(_model(aux_layers=(2,), pruning=spec).init,
                   jax.random.PRNGKey(0), _images(0))


def test_registering_a_policy():
  with pytest.raises(ValueError, match='already registered'):
    registry.register(dtop.DToP())

  class Bad(registry.Policy):
    name = 'bad'
    signals = frozenset({'edges'})

  with pytest.raises(ValueError, match=r"unknown signals \['edges'\]"):
    registry.register(Bad())


def _numpy_ranks(keys):
  want = np.empty(keys.shape, np.int32)
  order = np.argsort(keys, axis=-1, kind='stable')
  np.put_along_axis(want, order, np.arange(keys.shape[-1]), axis=-1)
  return want


@pytest.mark.parametrize('count_max', [ranking.COUNT_MAX_SLOTS, 0])
def test_ranks_is_a_stable_argsort(count_max, monkeypatch):
  # Both paths: counting compares (small buffers) and the sort (large ones).
  monkeypatch.setattr(ranking, 'COUNT_MAX_SLOTS', count_max)
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 4, (5, 23)).astype(np.float32)   # many ties
  keys[rng.random(keys.shape) < 0.3] = np.inf
  # A fresh function per call: jit caches traces per function.
  got = np.asarray(jax.jit(lambda k: registry.ranks(k))(jnp.asarray(keys)))
  np.testing.assert_array_equal(got, _numpy_ranks(keys))
  # Leading axes, and entries picked by rank.
  keys3 = rng.normal(size=(2, 3, 17)).astype(np.float32)
  keys3[0, 1, :5] = 0.5
  np.testing.assert_array_equal(ranking.ranks(jnp.asarray(keys3)),
                                _numpy_ranks(keys3))
  rank = rng.integers(0, 17, (2, 3, 4)).astype(np.int32)
  np.testing.assert_array_equal(
      ranking.take_ranked(jnp.asarray(keys3), jnp.asarray(rank)),
      np.take_along_axis(np.sort(keys3, axis=-1), rank, axis=-1))


def test_ranks_sort_past_the_compare_budget(monkeypatch):
  monkeypatch.setattr(ranking, 'COUNT_MAX_COMPARES', 100)
  keys = np.random.default_rng(1).integers(0, 3, (4, 9)).astype(np.float32)
  assert not ranking._counts(keys.shape)
  np.testing.assert_array_equal(registry.ranks(jnp.asarray(keys)),
                                _numpy_ranks(keys))


# ----------------------------------------------------------------------------
# Random policy.
# ----------------------------------------------------------------------------


def test_random_policy_is_seeded_and_buffer_matches_masked():
  # On MASK_MODEL: its decoder and heads attend over the remaining patches
  # only, so the buffer mode must reproduce the masked oracle.
  x = _images(7, batch=4)
  x = x.at[1].set(x[0])  # two equal images get the same choice
  cfg = dict(name='random', random=dict(exit_fraction=(0.5, 0.25), seed=3))
  logits, a = _run(x[:B], cfg, mask=True)
  _, again = _run(x[:B], cfg, mask=True)
  stage = np.asarray(a['exit_stage'])
  np.testing.assert_array_equal(stage, again['exit_stage'])
  # floor(0.5 * 16) = 8 exit at stage 0, floor(0.25 * 8) = 2 at stage 1.
  np.testing.assert_array_equal((stage == 0).sum(1), 8)
  np.testing.assert_array_equal((stage == 1).sum(1), 2)
  np.testing.assert_array_equal(stage[0], stage[1])
  assert (stage[0] != stage[2]).any()
  buf_logits, buf = _run(x[1:], dict(cfg, mode='buffer',
                                     capacities=(0.5, 0.375)), mask=True)
  np.testing.assert_array_equal(buf['overflow'], 0)
  # Same images, other batch positions and buffer mode: the same choice and
  # the same predictions.
  np.testing.assert_array_equal(buf['exit_stage'][:2], stage[1:])
  np.testing.assert_allclose(buf['token_logits'][:2], a['token_logits'][1:],
                             atol=1e-5)
  np.testing.assert_allclose(buf_logits[:2], logits[1:], atol=1e-5)
  for k in AUX:
    np.testing.assert_allclose(buf['aux_logits'][k][:2],
                               a['aux_logits'][k][1:], atol=1e-5)


def test_random_seed_changes_the_choice():
  policy = registry.get('random')
  images = _images(8, batch=2)
  valid = jnp.ones((2, N), bool)
  src = jnp.broadcast_to(jnp.arange(N), (2, N))
  ctx = registry.StageContext(stage=0, layer=1, grid=(4, 4), valid=valid,
                              src=src,
                              signals={},
                              prepared=random_exit.image_hash(images))
  params = [policy.make_params(ml_collections.ConfigDict(
      dict(exit_fraction=(0.5,), seed=s, reassemble='logits')), 2)
            for s in (0, 0, 1)]
  decide = jax.jit(policy.decide, static_argnums=1)
  a, b, c = (np.asarray(decide(ctx, p)) for p in params)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a.sum(1) == N // 2).all()


# ----------------------------------------------------------------------------
# Training with pruning live.
# ----------------------------------------------------------------------------


def test_one_training_step_with_dtop(tmp_path, monkeypatch):
  # pylint: disable=g-import-not-at-top
  from lvtp_jax.data import synthetic_scenes
  from lvtp_jax.train import loop
  from lvtp_jax.train import model_init
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  import quickstart
  # pylint: enable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  synthetic_scenes.prepare(data_dir, config='tiny')
  config = quickstart.get_config('runlocal')
  config.data.data_dir = data_dir
  config.train.update(progress=False, num_steps=1, warmup_steps=0)
  config.model.drop_path_rate = 0.1
  config.pruning = pruning.config_defaults()
  config.pruning.update(dict(name='dtop', mode='buffer', capacities=(0.5,)))
  config.pruning.dtop.threshold = 0.2
  real_build = model_init.build
  built = {}

  def build(cfg, seed):
    out = real_build(cfg, seed)
    built['params'] = jax.device_get(out[1])  # the step donates its input
    return out

  real_step = loop.make_train_step
  stepped = {}

  def make_train_step(model, *args):
    stepped['model'] = model
    return real_step(model, *args)

  monkeypatch.setattr(model_init, 'build', build)
  monkeypatch.setattr(loop, 'make_train_step', make_train_step)
  model, params, _ = loop.train(config, str(tmp_path / 'run'))
  # The step ran with the policy live; train() returns the unpruned model
  # (evaluation attaches each setting's policy).
  assert stepped['model'].pruning.name == 'dtop'
  assert stepped['model'].pruning.mode == 'buffer'
  assert model.pruning is None
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['pruning']['name'] == 'dtop'
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    row = json.loads(f.readline())
  assert np.isfinite(row['loss']) and 'aux_loss_1' in row
  # Gradients flowed: finite, and non-zero through the pruned encoder (Adam
  # moves a parameter without weight decay iff its gradient is non-zero;
  # blocks_1 runs after the exit boundary, with drop-path).
  initial = built['params']
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))
  for path in (('encoder', 'blocks_0', 'mlp', 'fc1', 'bias'),
               ('encoder', 'blocks_1', 'attn', 'qkv', 'bias'),
               ('encoder', 'patch_embed', 'proj', 'bias'),
               ('aux_head_1', 'decoder', 'head', 'bias'),
               ('decoder', 'head', 'bias')):
    old, new = initial, params
    for key in path:
      old, new = old[key], new[key]
    assert (np.asarray(old) != np.asarray(new)).mean() > 0.5, path


class _LowClsAttention(registry.Policy):
  """A policy on other signals: exits patches with below-mean CLS attention."""
  name = 'test_low_cls_attention'
  signals = frozenset({'cls_attn', 'image'})

  def prepare(self, images, params, *, normalization, patch_size):
    return images.mean(axis=(1, 2, 3))

  def decide(self, ctx, params):
    b, kp = ctx.valid.shape
    attn = ctx.signals['cls_attn']
    assert attn.shape == (b, MODEL.num_heads, 1 + kp), attn.shape
    assert ctx.prepared.shape == (b,) and 'aux_logits' in ctx.signals
    score = jnp.where(ctx.valid, attn.mean(axis=1)[:, 1:], 0.0)
    mean = score.sum(1, keepdims=True) / jnp.maximum(
        ctx.valid.sum(1, keepdims=True), 1)
    return ctx.valid & (score < mean)


def test_a_policy_on_attention_signals():
  # Registered for this test only: other tests (in this process, in any
  # order) see the registry as the package leaves it.
  assert _LowClsAttention.name not in pruning.names()
  registry.register(_LowClsAttention())
  try:
    logits, aux = _run(_images(9), dict(name=_LowClsAttention.name,
                                        mode='buffer', capacities=(0.75,)))
  finally:
    registry._REGISTRY.pop(_LowClsAttention.name)  # pylint: disable=protected-access
  stage = np.asarray(aux['exit_stage'])
  assert (stage == 0).any() and (stage == 1).any() and (stage == 2).any()
  assert np.isfinite(logits).all()
