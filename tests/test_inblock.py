"""In-block reductions (EViT, ToMe): parity with the official algorithms,
masked == buffer, token counts, the source map and the errors.

Parity: timm models with perturbed weights (tests/test_convert_timm.py's
rule), converted with from_timm, against the PyTorch restatements of the
official code in tests/torch_token_reduction.py; limit max |diff| <= 1e-4 x
max |logits| in float32, as the plain timm parity tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvtp_jax import pruning
from lvtp_jax.convert import from_timm
from lvtp_jax.measure import flops
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.pruning.policies import evit
from lvtp_jax.pruning.policies import tome
from tests import test_convert_timm as timm_parity
from tests import tiny_segmenter as tiny
from tests import torch_token_reduction as ref

_FORWARDS = {}


def _ours(model, params, x, cfg):
  pruned = pruning.attach(model, cfg)
  key = repr(pruned)
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(lambda p, im: pruned.apply(
        {'params': p}, im, return_aux=True))
  logits, aux = _FORWARDS[key](params, jnp.asarray(x))
  return np.asarray(logits), aux


def _reference(model, x, reduce):
  return ref.forward(model, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                     reduce).numpy()


@pytest.fixture(scope='module')
def deit_small():
  model = timm_parity.perturbed_timm('deit_small_patch16_224')
  ours, params = from_timm('deit_small_patch16_224', model.state_dict())
  return model, ours, params, timm_parity.images(2, 224, seed=1)


def test_the_reference_without_reduction_is_timm(deit_small):
  model, _, _, x = deit_small
  identity = lambda i, x, probs, keys, state: x
  timm_parity.assert_close(_reference(model, x, identity),
                           timm_parity.timm_logits(model, x))


@pytest.mark.parametrize('cfg, reduce', [
    (dict(), ref.evit((4, 7, 10), 0.7)),
    (dict(keep_rate=0.5, fuse_token=False), ref.evit((4, 7, 10), 0.5, False)),
    (dict(keep_rate=0.6, layers=(2, 3, 5, 9)), ref.evit((2, 3, 5, 9), 0.6)),
], ids=['default', 'keep0.5_nofuse', 'keep0.6_4layers'])
def test_evit_matches_the_official_rule(deit_small, cfg, reduce):
  model, ours, params, x = deit_small
  got, _ = _ours(ours, params, x, dict(name='evit', mode='buffer', evit=cfg))
  timm_parity.assert_close(got, _reference(model, x, reduce))


@pytest.mark.parametrize('cfg, reduce', [
    (dict(), ref.tome([13] * 12)),
    (dict(r=8, prop_attn=False), ref.tome([8] * 12, prop_attn=False)),
    (dict(r=8, inflect=-1.0), ref.tome(ref.tome_schedule(8, -1.0, 12))),
    (dict(r=70), ref.tome([70] * 12)),   # clipped to half in every block
], ids=['r13', 'r8_noprop', 'r8_decreasing', 'r70_clipped'])
def test_tome_matches_the_official_rule(deit_small, cfg, reduce):
  model, ours, params, x = deit_small
  got, _ = _ours(ours, params, x, dict(name='tome', mode='buffer', tome=cfg))
  timm_parity.assert_close(got, _reference(model, x, reduce))


@pytest.mark.parametrize('name, size', [
    ('vit_small_patch16_224', 224),      # AugReg
    ('deit_base_patch16_224', 160),      # a base model (smaller input)
])
def test_both_policies_on_other_models(name, size):
  model = timm_parity.perturbed_timm(name, img_size=size)
  ours, params = from_timm(name, model.state_dict(), img_size=size)
  x = timm_parity.images(2, size, seed=2)
  for cfg, reduce in ((dict(name='evit'), ref.evit((4, 7, 10), 0.7)),
                      (dict(name='tome', tome=dict(r=10)),
                       ref.tome([10] * 12))):
    got, _ = _ours(ours, params, x, dict(cfg, mode='buffer'))
    timm_parity.assert_close(got, _reference(model, x, reduce))


def test_tome_protects_the_distillation_token():
  name = 'deit_tiny_distilled_patch16_224'
  model = timm_parity.perturbed_timm(name)
  ours, params = from_timm(name, model.state_dict())
  x = timm_parity.images(2, 224, seed=3)
  got, aux = _ours(ours, params, x, dict(name='tome', mode='buffer'))
  timm_parity.assert_close(
      got, _reference(model, x, ref.tome([13] * 12, distill_token=True)))
  np.testing.assert_array_equal(aux['state'].size[:, :2], 1.0)


# ----------------------------------------------------------------------------
# Masked mode, counts, source map.
# ----------------------------------------------------------------------------

_TINY = vit_lib.create_vit('Ti/16', img_size=64, num_classes=10)
_TINY_PARAMS = tiny.random_params(_TINY, x_shape=(1, 64, 64, 3), scale=0.05)
_SETTINGS = [dict(name='evit', evit=dict(keep_rate=0.5)),
             dict(name='evit', evit=dict(keep_rate=0.6, fuse_token=False)),
             dict(name='tome', tome=dict(r=3)),
             dict(name='tome', tome=dict(r=2, inflect=-1.0,
                                         prop_attn=False))]


@pytest.mark.parametrize('cfg', _SETTINGS, ids=lambda c: str(c))
def test_masked_equals_buffer(cfg):
  x = np.asarray(tiny.images(4, batch=3)).repeat(2, axis=1).repeat(2, axis=2)
  masked, maux = _ours(_TINY, _TINY_PARAMS, x, dict(cfg, mode='masked'))
  buffer, baux = _ours(_TINY, _TINY_PARAMS, x, dict(cfg, mode='buffer'))
  np.testing.assert_allclose(masked, buffer, rtol=0, atol=1e-5)
  for key in ('valid_tokens', 'mlp_tokens'):
    np.testing.assert_array_equal(maux[key], baux[key])
  n_out = baux['state'].capacity
  assert maux['state'].capacity == 17 and n_out < 17
  np.testing.assert_array_equal(maux['state'].src, baux['state'].src)
  np.testing.assert_array_equal(maux['state'].valid[:, n_out:], False)


@pytest.mark.parametrize('cfg', _SETTINGS, ids=lambda c: str(c))
def test_counts_and_the_source_map(cfg):
  x = np.asarray(tiny.images(5, batch=3)).repeat(2, axis=1).repeat(2, axis=2)
  _, aux = _ours(_TINY, _TINY_PARAMS, x, dict(cfg, mode='buffer'))
  policy = pruning.get(cfg['name'])
  params = pruning.build_spec(cfg, _TINY).params
  counts = policy.token_counts(params, 17, 1, 12)
  np.testing.assert_array_equal(aux['valid_tokens'],
                                np.broadcast_to(counts[:-1], (3, 12)))
  np.testing.assert_array_equal(aux['mlp_tokens'],
                                np.broadcast_to(counts[1:], (3, 12)))
  state = aux['state']
  src, size = np.asarray(state.src), np.asarray(state.size)
  fused = cfg['name'] == 'tome' or cfg['evit'].get('fuse_token', True)
  if fused:  # every patch is represented by exactly one slot...
    assert (src >= 1).all()
  for b in range(3):
    # ... and each slot stands for as many patches as map to it.
    owned = np.bincount(src[b][src[b] >= 0], minlength=state.capacity)
    np.testing.assert_array_equal(owned[1:], size[b, 1:])
  assert size[:, 0].tolist() == [1.0] * 3


def test_published_macs_from_the_token_counts():
  """The spec's MAC model with our counts gives the papers' DeiT-S GMACs."""
  model = vit_lib.create_vit('S/16', num_classes=1000)

  def gmacs(cfg):
    policy = pruning.get(cfg['name'])
    counts = policy.token_counts(pruning.build_spec(cfg, model).params, 197,
                                 1, 12)
    return float(flops.vit_macs(model, (224, 224), counts[:-1],
                                counts[1:])) / 1e9

  # ToMe Table (DeiT-S r = 8 / 13 / 16): 3.4 / 2.7 / 2.3; EViT README (keep
  # 0.7, fused): 3.0; DeiT-S unpruned 4.6.
  assert round(gmacs(dict(name='tome', tome=dict(r=8))), 1) == 3.4
  assert round(gmacs(dict(name='tome', tome=dict(r=13))), 1) == 2.7
  assert round(gmacs(dict(name='tome', tome=dict(r=16))), 1) == 2.3
  assert round(gmacs(dict(name='evit')), 1) == 3.0
  assert round(float(flops.vit_macs(model, (224, 224))) / 1e9, 1) == 4.6


def test_schedule_and_counts():
  assert tome.schedule(8, 0.0, 12) == [8] * 12
  assert tome.schedule(8, -1.0, 12) == ref.tome_schedule(8, -1.0, 12)
  assert tome.schedule(8, -1.0, 12)[0] == 16 and tome.schedule(
      8, -1.0, 12)[-1] == 0
  params = tome.ToMeParams(r=70, inflect=0.0, prop_attn=True)
  counts = pruning.get('tome').token_counts(params, 197, 1, 12)
  # min(70, 196 // 2) = 70, then min(70, 126 // 2) = 63: at most half.
  assert counts[:3] == (197, 127, 64)
  assert evit.kept_count(0.6, 45) == 27  # float64, as the official code
  ev = evit.EViTParams(keep_rate=0.7, layers=(4, 7, 10), fuse_token=True)
  counts = pruning.get('evit').token_counts(ev, 197, 1, 12)
  # spec §1: 138+1, 98+1 and 70+1 patch tokens after blocks 4, 7, 10.
  assert [counts[k] for k in (3, 4, 7, 10, 12)] == [197, 140, 100, 72, 72]


def test_gradients_reach_the_fused_token_weights():
  model = vit_lib.create_vit('Ti/16', img_size=32, num_classes=10, depth=2)
  params = tiny.random_params(model, x_shape=(1, 32, 32, 3), scale=0.1)
  x = tiny.images(1, batch=2)
  pruned = pruning.attach(model, dict(name='evit', mode='buffer', evit=dict(
      keep_rate=0.5, layers=(1,))))
  grads = jax.grad(lambda p: pruned.apply({'params': p}, x).sum())(params)
  # The CLS query's key projection only matters through the fused weights
  # and the attention itself; both give finite, non-zero gradients.
  g = grads['blocks_0']['attn']['qkv']['kernel']
  assert np.isfinite(g).all() and np.abs(g).max() > 0


@pytest.mark.parametrize('cfg, match', [
    (dict(name='evit', evit=dict(keep_rate=0.0)), r'keep_rate=0.0 must lie'),
    (dict(name='evit', evit=dict(layers=(4, 13))), r'beyond the model'),
    (dict(name='tome', tome=dict(r=-1)), r'tome.r=-1 must be >= 0'),
    (dict(name='tome', tome=dict(inflect=2.0)), r'inflect=2.0 must lie'),
    (dict(name='dtop'), r'needs a Segmenter.*In-block reductions run on a '
     r"ViT: \['bat', 'evit', 'gtp', 'random_drop', 'tome'\]"),
])
def test_config_errors_name_the_field(cfg, match):
  with pytest.raises(ValueError, match=match):
    pruning.attach(_TINY, cfg)


# ----------------------------------------------------------------------------
# In-block reductions on the Segmenter: dense reassembly through `src`.
# ----------------------------------------------------------------------------

# 8 x 8 patches, 4 blocks: room for every policy to reduce.
_SEG = dict(img_size=64, depth=4, aux_layers=(2,))
_SEG_POLICIES = [
    dict(name='evit', evit=dict(keep_rate=0.5, layers=(2, 3))),
    dict(name='evit', evit=dict(keep_rate=0.5, layers=(2,),
                                fuse_token=False)),
    dict(name='tome', tome=dict(r=6)),
    dict(name='bat', bat=dict(keep_rate=0.5, layers=(2, 3))),
    dict(name='gtp', gtp=dict(num_prop=5, orphan_src='none',
                              graph_type='Spatial')),
]


def _dense_reference(src, grid, rule='source'):
  """NumPy restatement of the dense rules. 'source': src, with a -1 patch
  taking the src of the nearest patch that has one (ties: lower index).
  'interpolate': a patch alone in its slot keeps it; every other patch
  takes the slot of the nearest such patch."""
  h, w = grid
  out = src.copy()
  for b in range(src.shape[0]):
    def nearest(n, among):
      d2 = [(n // w - m // w) ** 2 + (n % w - m % w) ** 2 for m in among]
      return among[int(np.argmin(d2))]
    have = np.flatnonzero(src[b] >= 0)
    for n in np.flatnonzero(src[b] < 0):
      out[b, n] = src[b, nearest(n, have)]
    if rule == 'interpolate':
      alone = [m for m in have if (src[b] == src[b, m]).sum() == 1]
      if alone:
        out[b] = [src[b, nearest(n, alone)] for n in range(h * w)]
  return out


@pytest.mark.parametrize('cfg, decoder', [
    (cfg, 'linear') for cfg in _SEG_POLICIES] + [
        (_SEG_POLICIES[2], 'mask_transformer'),
        (dict(_SEG_POLICIES[0], dense='interpolate'), 'linear')], ids=str)
def test_every_reduction_on_the_segmenter(cfg, decoder):
  model = tiny.model(decoder=decoder, **_SEG)
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(5, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  out = {}
  for mode in ('masked', 'buffer'):
    pruned = pruning.attach(model, dict(cfg, mode=mode))
    out[mode] = jax.jit(lambda p, x, m=pruned: m.apply(
        {'params': p}, x, return_aux=True))(params, x)
  (masked, maux), (buffer, baux) = out['masked'], out['buffer']
  # The masked oracle and the real buffer agree, patch for patch.
  np.testing.assert_allclose(masked, buffer, rtol=0, atol=2e-5)
  for key in ('tokens_per_block', 'mlp_tokens_per_block'):
    np.testing.assert_array_equal(maux[key], baux[key])
  assert int(baux['mlp_tokens_per_block'][0, -1]) < 64
  # Dense reassembly: every patch decoded from the token its src names, as
  # the decoder would decode the final buffer's tokens themselves.
  state = baux['state']
  src = _dense_reference(np.asarray(state.src), (8, 8),
                         cfg.get('dense', 'source'))
  assert (src >= 0).all()
  if cfg.get('evit', {}).get('fuse_token') is False:
    assert (np.asarray(state.src) < 0).any()   # the nearest-source rule ran
  if decoder == 'linear':
    tokens = np.asarray(_final_tokens(model, params, state))
    kernel = np.asarray(params['decoder']['head']['kernel'])
    bias = np.asarray(params['decoder']['head']['bias'])
    want = np.take_along_axis(tokens, src[..., None], axis=1) @ kernel + bias
    np.testing.assert_allclose(baux['token_logits'], want, rtol=0,
                               atol=2e-5)


def _final_tokens(model, params, state):
  """The encoder's final LayerNorm of a buffer, [B, K, D]."""
  return model.apply({'params': params}, state.x,
                     method=lambda m, x: m.encoder.norm(x))


@pytest.mark.parametrize('cfg', [
    dict(_SEG_POLICIES[2], mode='masked'),
    dict(_SEG_POLICIES[1], mode='buffer', dense='interpolate'),
], ids=str)
def test_decoding_the_reduced_slots_equals_decoding_the_grid(cfg):
  """The mask transformer on the final slots, each with log(patches it
  decodes for) on its attention logits, gives the logits of decoding the
  grid of copies."""
  model = tiny.model(decoder='mask_transformer', **_SEG)
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(7, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  grid = pruning.attach(model, cfg).apply({'params': params}, x)
  reduced = pruning.attach(model, dict(cfg, decode='reduced')).apply(
      {'params': params}, x)
  np.testing.assert_allclose(reduced, grid, rtol=0, atol=2e-5)


def test_canvas_rule_keeps_the_auxiliary_prediction_of_patches_that_left():
  """dense='canvas': EViT drops half the patches in block 3, after the
  auxiliary head of block 2 saw every patch alone: the dropped ones keep
  that head's prediction, the kept ones the decoder's (as with 'source')."""
  model = tiny.model(img_size=64, depth=4, aux_layers=(2,))
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(8, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  cfg = dict(name='evit', evit=dict(keep_rate=0.5, layers=(3,)))
  out = {}
  for mode in ('masked', 'buffer'):
    out[mode] = pruning.attach(model, dict(cfg, mode=mode, dense='canvas')
                               ).apply({'params': params}, x, return_aux=True)
  np.testing.assert_allclose(out['masked'][0], out['buffer'][0], rtol=0,
                             atol=2e-5)
  _, aux = out['buffer']
  _, source = pruning.attach(model, dict(cfg, mode='buffer')).apply(
      {'params': params}, x, return_aux=True)
  src = np.asarray(aux['state'].src)
  kept = np.array([[(row == s).sum() == 1 for s in row] for row in src])
  assert 0 < kept.sum() < kept.size
  want = np.where(kept[..., None], source['token_logits'],
                  aux['aux_logits'][2])
  np.testing.assert_allclose(aux['token_logits'], want, rtol=0, atol=2e-5)
  with pytest.raises(ValueError, match=r"dense='canvas' .* has none"):
    pruning.attach(tiny.model(aux_layers=()), dict(cfg, dense='canvas'))


def test_a_reduction_that_keeps_everything_is_the_unpruned_segmenter():
  model = tiny.model(**_SEG)
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(6, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  want = model.apply({'params': params}, x)
  got = pruning.attach(model, dict(name='tome', mode='buffer',
                                   tome=dict(r=0))).apply({'params': params}, x)
  np.testing.assert_array_equal(got, want)


def test_dense_rule_is_validated():
  with pytest.raises(ValueError, match=r"config.pruning.dense='nearest'"):
    pruning.attach(tiny.model(), dict(name='tome', dense='nearest'))


# ----------------------------------------------------------------------------
# Composed policies: an exit policy and an in-block reduction in one forward.
# ----------------------------------------------------------------------------

_NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize('cfg', [
    dict(name='lvtp+tome', tome=dict(r=6)),
    dict(name='random+evit', evit=dict(keep_rate=0.5, layers=(2,)),
         random=dict(exit_fraction=(0.5,)), capacities=(0.5,)),
], ids=str)
def test_composed_policy_masked_equals_buffer(cfg):
  model = tiny.model(img_size=64, depth=4, aux_layers=(3,))
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(5, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  out = {}
  for mode in ('masked', 'buffer'):
    pruned = pruning.attach(model, dict(cfg, mode=mode), normalization=_NORM)
    out[mode] = pruned.apply({'params': params}, x, return_aux=True)
  (masked, maux), (buffer, baux) = out['masked'], out['buffer']
  np.testing.assert_allclose(masked, buffer, rtol=0, atol=2e-5)
  for key in ('tokens_per_block', 'mlp_tokens_per_block', 'exit_stage'):
    np.testing.assert_array_equal(maux[key], baux[key])
  tokens = np.asarray(baux['tokens_per_block'])
  if cfg['name'] == 'lvtp+tome':
    # ToMe merges 6 in each block before the boundary at block 3, then the
    # exit engine takes over on the merged buffer.
    np.testing.assert_array_equal(tokens[:, :3], [[64, 58, 52]] * 2)
    np.testing.assert_array_equal(baux['mlp_tokens_per_block'][:, :2],
                                  [[58, 52]] * 2)
  else:
    assert (tokens[:, 2] == 33).all() and (tokens[:, 3] == 17).all()
    # A merged slot exits with every patch it stands for: 31 of the 64
    # patches were dropped into the fused token, which exits as one.
    assert (np.asarray(baux['exit_stage']) == 0).any()
  # Masked mode has no capacities: the oracle holds while nothing overflows.
  np.testing.assert_array_equal(baux['overflow'], 0)


def test_composed_with_a_reduction_that_keeps_everything_is_the_exit_policy():
  model = tiny.model(img_size=64, depth=4, aux_layers=(3,))
  params = tiny.random_params(model, x_shape=(1, 64, 64, 3), scale=0.1)
  x = np.asarray(tiny.images(6, batch=2)).repeat(2, axis=1).repeat(2, axis=2)
  want = pruning.attach(model, dict(name='lvtp', mode='buffer'),
                        normalization=_NORM).apply({'params': params}, x)
  got = pruning.attach(model, dict(name='lvtp+tome', mode='buffer',
                                   tome=dict(r=0)),
                       normalization=_NORM).apply({'params': params}, x)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('cfg, match', [
    (dict(name='tome+dtop'), r'one exit policy .* then one in-block'),
    (dict(name='none+tome'), r'one exit policy'),
    (dict(name='dtop+gtp'), r'carries state from block to block'),
    (dict(name='dtop+evit', evit=dict(layers=(3,))),
     r'acts in blocks 1-2, before the first stage boundary \(block 3\)'),
], ids=str)
def test_composed_policy_errors(cfg, match):
  model = tiny.model(img_size=64, depth=4, aux_layers=(3,))
  with pytest.raises(ValueError, match=match):
    pruning.attach(model, cfg)
