"""bfloat16 compute (config.model.dtype): what stays float32, how close the
outputs are, and that the pruning decisions do not move.

Tolerances (float32 vs bfloat16 of the same parameters, on the CPU):
  logits          relative Frobenius error <= 3e-2 (measured 0.6-1.5% on the
                  tiny Segmenters and a timm DeiT-Ti at 64 px);
  pixel argmax    >= 97% equal (measured 99.6-100%);
  exit decisions  >= 95% of the patches exit at the same stage (measured
                  98.2-100% with a DToP threshold at the median confidence,
                  the most borderline choice); the random policy exactly.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lvtp_jax import models
from lvtp_jax import pruning
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.pruning import engine
from lvtp_jax.train import checkpoint
from lvtp_jax.train import optim
from lvtp_jax.train import step as step_lib
from tests import tiny_segmenter as tiny

_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
_REDUCTIONS = ('reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod',
               'argmax', 'argmin', 'cumsum', 'cummax', 'cumlogsumexp')


def _equations(jaxpr):
  """Every equation of a closed jaxpr, nested ones (jit, custom_jvp) too."""
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)
    yield eqn


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _pruned(model, cfg):
  return pruning.attach(model, cfg, normalization=_NORM) if cfg else model


@pytest.mark.parametrize('decoder', ['linear', 'mask_transformer'])
@pytest.mark.parametrize('cfg', [
    None, dict(name='dtop', mode='buffer', capacities=(0.5,)),
    dict(name='lvtp', mode='buffer', capacities=(0.5,)),
], ids=['unpruned', 'dtop', 'lvtp'])
def test_bfloat16_forward_keeps_statistics_in_float32(decoder, cfg):
  model = models.with_dtype(tiny.model(decoder=decoder), 'bfloat16')
  params = tiny.random_params(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  closed = jax.make_jaxpr(lambda p, x: _pruned(model, cfg).apply(
      {'params': p}, x))(params, tiny.images(0))
  eqns = list(_equations(closed.jaxpr))
  bf16 = [e for e in eqns if e.primitive.name == 'dot_general'
          and e.invars[0].aval.dtype == jnp.bfloat16]
  # Every block's qkv/proj/fc1/fc2 and both attention products at least.
  assert len(bf16) >= 6 * model.depth
  low = [(e.primitive.name, e.invars[0].aval.dtype) for e in eqns
         if e.primitive.name in _REDUCTIONS
         and jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)
         and e.invars[0].aval.dtype != jnp.float32]
  assert not low, f'reductions below float32: {low}'
  # The attention logits (the softmax input) are produced in float32.
  assert any(e.primitive.name == 'dot_general'
             and e.invars[0].aval.dtype == jnp.bfloat16
             and e.outvars[0].aval.dtype == jnp.float32 for e in eqns)


@pytest.mark.parametrize('decoder', ['linear', 'mask_transformer'])
def test_bfloat16_segmenter_logits_are_close(decoder):
  model = tiny.model(decoder=decoder)
  params = tiny.random_params(model)
  x = tiny.images(5, batch=8)
  bf = models.with_dtype(model, 'bfloat16')
  f32 = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  b16 = jax.jit(lambda p, x: bf.apply({'params': p}, x))(params, x)
  assert b16.dtype == jnp.float32
  assert _rel(b16, f32) <= 3e-2
  assert (np.argmax(b16, -1) == np.argmax(f32, -1)).mean() >= 0.97


def test_bfloat16_vit_logits_are_close_to_float32():
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  ref = timm.create_model('deit_tiny_patch16_224', pretrained=False,
                          img_size=64)
  sd = {k: v + 0.02 * torch.randn_like(v) for k, v in ref.state_dict().items()}
  model, params = timm_convert.from_timm('deit_tiny_patch16_224', sd,
                                         img_size=64)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (8, 64, 64, 3)).astype(np.float32))
  f32 = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  bf = models.with_dtype(model, 'bfloat16')
  b16 = jax.jit(lambda p, x: bf.apply({'params': p}, x))(params, x)
  assert b16.dtype == jnp.float32  # logits are returned in float32
  assert _rel(b16, f32) <= 3e-2
  assert (np.argmax(b16, -1) == np.argmax(f32, -1)).mean() >= 0.97


def test_pruning_decisions_are_stable_in_bfloat16():
  # Decisions read the auxiliary heads (and pixels), not the decoder.
  model = tiny.model()
  params = tiny.random_params(model)
  bf = models.with_dtype(model, 'bfloat16')
  x = tiny.images(5, batch=32)

  def run(m, cfg):
    fwd = jax.jit(lambda p, x: _pruned(m, cfg).apply({'params': p}, x,
                                                     return_aux=True))
    return fwd(params, x)[1]

  conf = engine.confidence(run(model, None)['aux_logits'][tiny.AUX[0]])
  median = float(np.median(conf))  # half the patches are candidates
  settings = [dict(name='dtop', dtop=dict(threshold=median, top_k=1)),
              dict(name='lvtp'),
              dict(name='lvtp', mode='buffer', capacities=(0.6, 0.4)),
              dict(name='random')]
  for cfg in settings:
    want = np.asarray(run(model, cfg)['exit_stage'])
    got = np.asarray(run(bf, cfg)['exit_stage'])
    assert (want < len(tiny.AUX)).mean() > 0.2, cfg  # patches do exit
    agree = (got == want).mean()
    if cfg['name'] == 'random':
      assert agree == 1.0
    else:
      assert agree >= 0.95, (cfg, agree)


def test_bfloat16_training_step():
  model = tiny.model()
  params = tiny.random_params(model)
  train = optim.config_defaults()
  train.update(dict(optimizer='sgd', lr=1e-2))
  train.aux_weight = 0.4
  train.aux_loss = 'pixel'
  config = ml_collections.ConfigDict(dict(train=train))
  tx = optim.make_optimizer(config.train)
  schedule = optim.make_schedule(config.train)
  mesh = step_lib.make_mesh(1)
  rng = np.random.default_rng(0)
  batch = dict(image=tiny.images(3, batch=4),
               segmentation=jnp.asarray(rng.integers(0, tiny.C,
                                                     (4, tiny.HW, tiny.HW))))
  out = {}
  base = jax.tree.map(np.asarray, params)
  for dtype in ('float32', 'bfloat16'):
    m = models.with_dtype(model, dtype)
    params = jax.tree.map(jnp.asarray, base)  # the step donates its state
    state = dict(params=params, opt_state=tx.init(params),
                 step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    state, metrics = step_lib.make_train_step(m, tx, schedule, config,
                                              mesh)(state, batch)
    assert all(p.dtype == jnp.float32
               for p in jax.tree.leaves(state['params']))
    assert all(p.dtype == jnp.float32
               for p in jax.tree.leaves(state['opt_state'])
               if jnp.issubdtype(p.dtype, jnp.floating))
    out[dtype] = (float(metrics['loss']), state['params'])
  assert np.isfinite(out['bfloat16'][0])
  assert abs(out['bfloat16'][0] - out['float32'][0]) <= (
      2e-2 * out['float32'][0])
  # The update has the direction of the float32 one.
  moved = [(np.asarray(b) - np.asarray(a), np.asarray(f) - np.asarray(a))
           for a, b, f in zip(jax.tree.leaves(base),
                              jax.tree.leaves(out['bfloat16'][1]),
                              jax.tree.leaves(out['float32'][1]))]
  delta_b = np.concatenate([d.ravel() for d, _ in moved])
  delta_f = np.concatenate([d.ravel() for _, d in moved])
  cosine = delta_b @ delta_f / np.linalg.norm(delta_b) / np.linalg.norm(
      delta_f)
  assert cosine > 0.99


def test_dtype_names_and_errors():
  assert models.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match=r"config.model.dtype='float16'"):
    models.compute_dtype('float16')
  model = tiny.model()
  assert models.with_dtype(model, 'float32') is model


def test_a_run_saved_before_the_dtype_field_resumes():
  stored = {'model': {'width': 32}, 'train': {'lr': 0.1}}
  current = ml_collections.ConfigDict(
      dict(model=dict(width=32, dtype='float32'), train=dict(lr=0.1)))
  assert checkpoint.config_differences(stored, current) == []
  current.model.dtype = 'bfloat16'
  assert checkpoint.config_differences(stored, current) == [
      "model.dtype: 'float32' -> 'bfloat16'"]
