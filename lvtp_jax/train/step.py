"""The jitted training step and the device mesh it runs on.

Kept apart from loop.py (the input pipeline, checkpoints and logging) so that
the step can be built and timed without any dataset code: the accelerator
suite (lvtp_jax.bench.suite) times exactly this function on synthetic
batches.

Loss = pixel cross-entropy of the final logits (ignore 255)
       + train.aux_weight * sum_k loss of aux head k, by train.aux_loss
       (see loop.py). Losses are computed in float32 whatever the model's
       compute dtype (losses.py casts the logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lvtp_jax.train import losses

AUX_LOSSES = ('pixel', 'token')


def make_train_step(model, tx, schedule, config, mesh):
  """jit(state, batch) -> (state, metrics) over `mesh`, donating the state."""
  aux_weight = config.train.aux_weight
  aux_loss = config.train.get('aux_loss', 'pixel')

  def loss_fn(params, batch, rng):
    logits, aux = model.apply(
        {'params': params}, batch['image'], train=True, return_aux=True,
        rngs={'dropout': rng})
    labels = batch['segmentation']
    metrics = {'main_loss': losses.pixel_cross_entropy(logits, labels)}
    total = metrics['main_loss']
    if aux['aux_logits'] and aux_loss == 'token':
      targets, valid = losses.token_targets(labels, model.patch_size,
                                            model.num_classes)
    for k, token_logits in aux['aux_logits'].items():
      if aux_loss == 'pixel':
        metrics[f'aux_loss_{k}'] = losses.pixel_cross_entropy(
            losses.upsample_like(token_logits, labels, model.patch_size),
            labels)
      else:
        metrics[f'aux_loss_{k}'] = losses.token_cross_entropy(
            token_logits, targets, valid)
      total = total + aux_weight * metrics[f'aux_loss_{k}']
    metrics['loss'] = total
    return total, metrics

  return _jit_step(loss_fn, tx, schedule, mesh)


def make_classification_step(model, tx, schedule, config, mesh):
  """jit(state, batch) -> (state, metrics) for a ViT classifier.

  Loss: cross-entropy of the logits (float32) against batch['label'], with
  config.train.label_smoothing (0: none). A pruning policy attached to the
  model (an EViT fine-tune) runs live in the forward. metrics: loss,
  train top-1 (percent) and lr.
  """
  smoothing = config.train.get('label_smoothing', 0.0)

  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': rng}).astype(jnp.float32)
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch['label'], logits.shape[-1]), smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    top1 = 100.0 * (logits.argmax(-1) == batch['label']).mean()
    return loss, dict(loss=loss, train_top1=top1)

  return _jit_step(loss_fn, tx, schedule, mesh)


def _jit_step(loss_fn, tx, schedule, mesh):
  """The jitted update around loss_fn(params, batch, rng) -> (loss, metrics)."""

  def step_fn(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state['params'], batch, rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    metrics['lr'] = schedule(state['step'])
    return dict(params=optax.apply_updates(state['params'], updates),
                opt_state=opt_state, step=state['step'] + 1,
                rng=state['rng']), metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  return jax.jit(step_fn, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-d ('data',) mesh (Auto axis: GSPMD decides the collectives).

  Args:
    num_devices: use the first this many devices (0 = all of them).
  """
  devices = jax.devices()
  if not 0 <= num_devices <= len(devices):
    raise ValueError(f'train.num_devices={num_devices} but there are '
                     f'{len(devices)} devices (0 = all).')
  devices = devices[:num_devices or None]
  return jax.sharding.Mesh(np.asarray(devices), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))
