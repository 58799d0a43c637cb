"""Classification training: `train_and_evaluate(config, workdir)` for a ViT.

The classification test bed (configs/quickstart_cls.py): a DeiT-style ViT
from random initialisation on synthetic_objects, or, with
config.model.init_from naming a train.py workdir (or a converted
classifier), a fine-tune from it; with config.pruning set (EViT's own
protocol, spec classification_policies.md §2.2) the policy runs live in the
training forward.

Shared with segmentation training (loop.py): the ('data',) mesh, the
optimizer and schedule (optim.py), checkpoints and resume
(checkpoint.py), metrics.jsonl (loss, train_top1, lr, images/s per log
interval; every train.eval_every steps a line with eval_top1 on the first
train.eval_examples validation images) and the non-finite-loss stop.
Loss: cross-entropy with train.label_smoothing (step.py). At the end,
every setting of config.sweep is evaluated (lvtp_jax.evaluation.
classification) and written to WORKDIR/results.json.
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax import models
from lvtp_jax import pretrained
from lvtp_jax import pruning
from lvtp_jax.data import synthetic_objects
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import checkpoint
from lvtp_jax.train import loop
from lvtp_jax.train import model_init
from lvtp_jax.train import optim
from lvtp_jax.train.step import make_classification_step

_SHAPE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size',
                 'img_size', 'num_classes')


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError naming an out-of-range field and the fix."""
  t = config.train
  optim.validate(t)
  if t.batch_size <= 0 or t.batch_size % num_devices:
    raise ValueError(
        f'train.batch_size={t.batch_size} must be a positive multiple of the '
        f'number of devices ({num_devices}).')
  if t.log_every <= 0:
    raise ValueError(f'train.log_every={t.log_every} must be > 0.')
  if t.get('eval_every', 0) < 0 or t.get('eval_examples', 0) < 0:
    raise ValueError(f'train.eval_every={t.eval_every} and train.eval_examples'
                     f'={t.eval_examples} must be >= 0.')
  if not 0.0 <= t.get('label_smoothing', 0.0) < 1.0:
    raise ValueError(f'train.label_smoothing={t.label_smoothing} not in '
                     '[0, 1).')
  if config.data.name != synthetic_objects.NAME:
    raise ValueError(
        f'config.data.name={config.data.name!r}: classification training '
        f'reads the built-in {synthetic_objects.NAME!r} only (ImageNet '
        'training is not implemented here; evaluate converted timm weights '
        'with configs/deit_imagenet.py).')
  pcfg = pruning.resolve(config.get('pruning'))
  if pcfg.name != 'none' and pruning.kind(pcfg.name) != 'reduce':
    raise ValueError(
        f'config.pruning.name={pcfg.name!r} exits tokens at auxiliary heads '
        'of the Segmenter; a ViT classifier trains with an in-block reduction '
        f'({[n for n in pruning.names() if pruning.get(n).kind == "reduce"]})'
        ' or none.')


def build(cfg: ml_collections.ConfigDict, seed: int
          ) -> Tuple[vit_lib.ViT, Any, Dict[str, Any]]:
  """(model, params, prep) to train: random init from the config's shape,
  or the weights of init_from (a train.py workdir or a converted
  classifier), whose architecture must be the config's."""
  prep = dict(img_size=cfg.img_size, crop_pct=1.0,
              mean=tuple(synthetic_objects.MEAN),
              std=tuple(synthetic_objects.STD), interpolation='bicubic')
  fields = {k: cfg[k] for k in _SHAPE_FIELDS}
  model = vit_lib.ViT(drop_path_rate=cfg.get('drop_path_rate', 0.0),
                      **fields)
  fresh = jax.jit(model.init)(
      jax.random.PRNGKey(seed),
      jnp.zeros((1, cfg.img_size, cfg.img_size, 3)))['params']
  params = fresh
  if cfg.init_from:
    source, loaded, prep = checkpoint.load_weights(cfg.init_from)
    if not isinstance(source, vit_lib.ViT):
      raise ValueError(f'{cfg.init_from} holds a {type(source).__name__}; a '
                       'classifier fine-tune starts from a ViT.')
    stored = {k: getattr(source, k) for k in _SHAPE_FIELDS}
    diffs = [f'model.{k}: {stored[k]} in {cfg.init_from}, {fields[k]} in the '
             'config' for k in _SHAPE_FIELDS if stored[k] != fields[k]]
    if diffs:
      raise ValueError('config.model.init_from has another architecture than '
                       'the config:\n  ' + '\n  '.join(diffs) +
                       '\nSet the config fields to the checkpoint\'s.')
    params, initialised = model_init.merge_params(loaded, fresh)
    if initialised:
      raise ValueError(f'{cfg.init_from} lacks parameters {initialised[:5]}.')
  model = models.with_dtype(model, cfg.get('dtype', 'float32'))
  return model, params, prep


def _periodic_eval(config, model, params, prep, step: int, path: str
                   ) -> Dict[str, float]:
  from lvtp_jax.evaluation import classification as cls_eval  # pylint: disable=g-import-not-at-top
  top1, num = cls_eval.quick_top1(config, model, params, prep,
                                  config.train.eval_examples)
  row = dict(step=step, eval_images=num, eval_top1=top1)
  loop.append_jsonl(path, row)
  return row


def train(config: ml_collections.ConfigDict, workdir: str
          ) -> Tuple[vit_lib.ViT, Any, Dict[str, Any]]:
  """Trains config's ViT in workdir, resuming from its checkpoint.

  Returns:
    (model, params, prep): the ViT (unpruned, in the config's dtype), its
    trained parameters (host arrays) and its data description.
  """
  mesh = loop.start_run(config, workdir, validate)
  model, params, prep = build(config.model, config.seed)
  train_model = pruning.attach(model, config.get('pruning'))
  model_meta = dict(architecture='vit', data=dict(prep),
                    model=pretrained.module_fields(
                        models.with_dtype(model, 'float32')))
  source = synthetic_objects.open_source(
      config.data.train_split, config.data.difficulty.to_dict()
      if config.data.get('difficulty') else None)
  if source.difficulty.size != config.model.img_size:
    raise ValueError(f'the {synthetic_objects.NAME} images are '
                     f'{source.difficulty.size} px but model.img_size is '
                     f'{config.model.img_size}; set data.difficulty.size.')
  d = source.difficulty
  if d.chain and d.cell != config.model.patch_size:
    raise ValueError(f'the lookup task\'s cards are {d.cell} px '
                     f'(data.difficulty.cell) but model.patch_size is '
                     f'{config.model.patch_size}: a card is meant to be one '
                     'patch; set data.difficulty.cell.')
  tx = optim.make_optimizer(config.train)
  schedule = optim.make_schedule(config.train)
  state, start, ckpt = loop.start_state(config, workdir, params, tx, mesh)
  train_step = make_classification_step(train_model, tx, schedule, config,
                                        mesh)
  batches = synthetic_objects.train_batches(
      source, batch_size=config.train.batch_size, start_step=start,
      mean=prep['mean'], std=prep['std'],
      num_threads=config.train.num_threads,
      process_index=jax.process_index(), process_count=jax.process_count())

  def quick_eval(params, step, path):
    row = _periodic_eval(config, model, params, prep, step, path)
    return (f'step {step}: eval_top1 {row["eval_top1"]:.2f} on '
            f'{row["eval_images"]} images')

  state = loop.run_steps(
      config, workdir, state=state, start=start, ckpt=ckpt, mesh=mesh,
      train_step=train_step, batches=batches, model_meta=model_meta,
      quick_eval=quick_eval,
      postfix=lambda row: dict(loss=f'{row["loss"]:.4f}',
                               top1=f'{row["train_top1"]:.1f}',
                               img_s=f'{row["images_per_second"]:.1f}'))
  return model, jax.device_get(state['params']), prep


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """`train`, then every setting of config.sweep -> workdir/results.json."""
  from lvtp_jax.evaluation import classification as cls_eval  # pylint: disable=g-import-not-at-top
  model, params, prep = train(config, workdir)
  return loop.write_results(config, workdir, cls_eval.evaluate_sweep(
      config, model, params, prep,
      weights=f'{workdir}/checkpoints/{config.train.num_steps}'), merge=True)
