"""ViT on a TokenState: masking, proportional attention, signals, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvtp_jax.models import posemb as posemb_lib
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.tokens import state as ts

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
            img_size=32, num_classes=5)


def _model_and_params(**kw):
  model = vit_lib.ViT(**dict(TINY, **kw))
  x = jnp.zeros((1, model.img_size, model.img_size, 3))
  return model, model.init(jax.random.PRNGKey(0), x)['params']


def _block_and_params(d=32, heads=4):
  block = vit_lib.Block(num_heads=heads, mlp_dim=2 * d)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, d))
  s = ts.init_state(x, num_prefix=1)
  return block, block.init(jax.random.PRNGKey(0), s)['params'], s


def test_variant_table_and_unknown_variant():
  assert vit_lib.variant_fields('B/8') == dict(
      width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=8)
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit_lib.variant_fields('XL/16')
  with pytest.raises(ValueError, match='patch size 14'):
    vit_lib.variant_fields('S/14')


def test_output_shapes_distilled_and_features_only():
  model, params = _model_and_params(distilled=True)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 48, 3))
  logits, aux = model.apply({'params': params}, x, return_aux=True)
  assert logits.shape == (3, 5)
  assert aux['tokens'].shape == (3, 2 + 4 * 6, 32)
  np.testing.assert_array_equal(aux['valid_tokens'], np.full((3, 2), 26))
  feats_model, feats_params = _model_and_params(num_classes=0)
  assert feats_model.apply({'params': feats_params}, x).shape == (3, 32)


def test_distilled_output_is_the_mean_of_both_heads():
  model, params = _model_and_params(distilled=True)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  logits, aux = model.apply({'params': params}, x, return_aux=True)
  t = aux['tokens']
  h = lambda name, v: v @ params[name]['kernel'] + params[name]['bias']
  want = (h('head', t[:, 0]) + h('head_dist', t[:, 1])) / 2
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((1, 32, 32, 1), np.float32), '3 channels'),
    (np.zeros((1, 3, 32, 32), np.float32), '3 channels'),
    (np.zeros((1, 32, 32, 3), np.uint8), 'floating point'),
    (np.zeros((1, 36, 32, 3), np.float32), 'not divisible by the patch size 8'),
    (np.zeros((32, 32, 3), np.float32), r'\[B, H, W, 3\]'),
])
def test_bad_images_raise_clear_errors(bad, match):
  model, params = _model_and_params()
  with pytest.raises(ValueError, match=match):
    model.apply({'params': params}, jnp.asarray(bad))


def test_all_valid_mask_changes_nothing():
  block, params, s = _block_and_params()
  a, _ = block.apply({'params': params}, s, masked=False)
  b, _ = block.apply({'params': params}, s, masked=True)
  np.testing.assert_allclose(a.x, b.x, rtol=1e-6, atol=1e-6)


def test_empty_slots_are_invisible_to_valid_tokens():
  # Valid tokens must come out the same whether the padding slots are there
  # (masked) or physically removed from the buffer.
  block, params, s = _block_and_params()
  keep = np.array([0, 2, 3, 5, 8])
  valid = np.zeros(s.valid.shape, bool)
  valid[:, keep] = True
  junk = s.x.at[:, ~valid[0]].set(1e3)
  padded = s.replace(x=junk, valid=jnp.asarray(valid))
  out_padded, _ = block.apply({'params': params}, padded, masked=True)
  small = ts.init_state(s.x[:, keep], num_prefix=1)
  out_small, _ = block.apply({'params': params}, small, masked=False)
  np.testing.assert_allclose(out_padded.x[:, keep], out_small.x, rtol=1e-5,
                             atol=1e-5)


def test_proportional_attention_equals_duplicated_tokens():
  # A slot of size 2 under proportional attention acts like two identical
  # slots of size 1 (ToMe's motivation for adding log(size)).
  block, params, s = _block_and_params()
  x = s.x
  dup = jnp.concatenate([x, x[:, -1:]], axis=1)
  dup_state = ts.init_state(dup, num_prefix=1)
  out_dup, _ = block.apply({'params': params}, dup_state)
  size = jnp.ones(s.size.shape).at[:, -1].set(2.0)
  out_prop, _ = block.apply({'params': params}, s.replace(size=size),
                            proportional=True)
  np.testing.assert_allclose(out_prop.x, out_dup.x[:, :-1], rtol=1e-5,
                             atol=1e-5)


def test_signals_only_when_asked_and_consistent():
  block, params, s = _block_and_params(heads=4)
  _, none = block.apply({'params': params}, s)
  assert none == {}
  _, sig = block.apply({'params': params}, s,
                       want=frozenset({'cls_attn', 'attn', 'keys'}))
  assert sig['attn'].shape == (2, 4, 9, 9)
  assert sig['keys'].shape == (2, 4, 9, 8)
  np.testing.assert_array_equal(sig['cls_attn'], sig['attn'][:, :, 0])
  np.testing.assert_allclose(sig['attn'].sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='unknown attention signals'):
    block.apply({'params': params}, s, want=frozenset({'values'}))


def test_other_input_size_resamples_pos_embed_in_forward():
  model, params = _model_and_params()
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 64, 64, 3))
  logits, aux = model.apply({'params': params}, x, return_aux=True)
  assert logits.shape == (1, 5) and aux['tokens'].shape[1] == 1 + 64
  assert np.isfinite(np.asarray(logits)).all()


def _sincos_by_definition(h, w, d, temperature=10000.0):
  """posemb.sincos2d's docstring formula, one value at a time."""
  q = d // 4
  out = np.zeros((h * w, d))
  for r in range(h):
    for c in range(w):
      for k in range(q):
        f = temperature ** (-k / q)
        out[r * w + c, [k, q + k, 2 * q + k, 3 * q + k]] = (
            math.sin(r * f), math.cos(r * f), math.sin(c * f),
            math.cos(c * f))
  return out


def test_sincos2d_table_and_its_offset_property():
  table = posemb_lib.sincos2d((3, 5), 16)
  assert table.shape == (1, 15, 16) and table.dtype == np.float32
  np.testing.assert_allclose(table[0], _sincos_by_definition(3, 5, 16),
                             atol=1e-6)
  # Two patches' dot product depends on their offset only.
  grid = posemb_lib.sincos2d((6, 6), 32)[0].reshape(6, 6, 32).astype(
      np.float64)
  dot = lambda a, b: float(grid[a] @ grid[b])
  assert dot((0, 0), (1, 2)) == pytest.approx(dot((3, 2), (4, 4)), abs=1e-5)
  assert dot((2, 2), (2, 2)) > dot((2, 2), (2, 3)) > dot((2, 2), (5, 5))
  with pytest.raises(ValueError, match='divisible by 4'):
    posemb_lib.sincos2d((2, 2), 30)


def test_sincos2d_vit_has_no_pos_embed_and_follows_the_grid():
  model, params = _model_and_params(posemb='sincos2d')
  assert 'pos_embed' not in params and 'cls_token' in params
  for side in (32, 64):   # 64 px: a 8 x 8 grid, computed, not resampled
    x = jax.random.normal(jax.random.PRNGKey(6), (2, side, side, 3))
    state, grid = model.apply({'params': params}, x,
                              method=lambda m, x: m.embed(x))
    patches = model.apply({'params': params}, x,
                          method=lambda m, x: m.patch_embed(x))
    n = (side // 8) ** 2
    want = np.asarray(patches).reshape(2, n, 32) + _sincos_by_definition(
        side // 8, side // 8, 32)
    np.testing.assert_allclose(np.asarray(state.x[:, 1:]), want, atol=1e-5)
    np.testing.assert_array_equal(   # the CLS token gets no embedding
        np.asarray(state.x[:, 0]),
        np.broadcast_to(np.asarray(params['cls_token'])[0], (2, 32)))
    assert grid == (side // 8, side // 8)
  with pytest.raises(ValueError, match="posemb='nope'"):
    _model_and_params(posemb='nope')
  with pytest.raises(ValueError, match='divisible by 4'):
    _model_and_params(posemb='sincos2d', width=30, num_heads=3)


def test_drop_path_is_active_only_in_training():
  model, params = _model_and_params(drop_path_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  eval_a = model.apply({'params': params}, x)
  eval_b = model.apply({'params': params}, x, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = model.apply({'params': params}, x, train=True,
                      rngs={'dropout': jax.random.PRNGKey(0)})
  assert not np.allclose(train, eval_a)


def test_runs_saved_before_the_posemb_field_still_load():
  """A checkpoint written before model.posemb existed had a learnt position
  embedding: resuming it and evaluating it with today's configs
  (posemb='learn') is allowed, with 'sincos2d' refused."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lvtp_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  class _Stored:   # stands in for orbax's CheckpointManager
    def restore(self, step, args):
      del step, args
      return {'meta': {'config': {'model': {'width': 32}}, 'model': {}}}

  for posemb, refused in (('learn', False), ('sincos2d', True)):
    current = ml_collections.ConfigDict(
        dict(model=dict(width=32, posemb=posemb)))
    assert bool(checkpoint.config_differences(
        {'model': {'width': 32}}, current)) == refused
    if refused:
      with pytest.raises(ValueError, match="model.posemb: 'learn' -> "
                         "'sincos2d'"):
        checkpoint._read_eval_meta(_Stored(), 'old_run', 7, current)  # pylint: disable=protected-access
    else:
      checkpoint._read_eval_meta(_Stored(), 'old_run', 7, current)  # pylint: disable=protected-access
