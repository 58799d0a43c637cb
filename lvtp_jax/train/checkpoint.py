"""Resumable training checkpoints: WORKDIR/checkpoints/<step>/ (Orbax).

Each step directory holds two items:
  state  the train state {'params', 'opt_state', 'step', 'rng'} (StandardSave)
  meta   JSON {'config': the run's config, 'data_position': step,
               'architecture', 'model': the module's fields,
               'data': {'mean', 'std'} the images were normalised with}
The data position is the step because `train_batches(start_step=step)`
rebuilds the input stream exactly (lvtp_jax.data.segmentation), so no
iterator state is stored.

A workdir belongs to one experiment: resuming compares the stored config with
the current one and refuses when fields that change the run differ (say, a
different lr), naming them. Fields in RESUMABLE_FIELDS may differ: they
do not change what a step computes (logging, checkpoint cadence, evaluation,
paths). train.num_steps is among them so that a finished run can be
extended; note that the polynomial decay then follows the new length from
the resume point on. Set config.train.overwrite=True (train.py --restart) to
delete the old checkpoints and start over.
"""

import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Dotted config prefixes that may change between a run and its resumption.
RESUMABLE_FIELDS = (
    'train.num_steps',
    'train.log_every',
    'train.checkpoint_every',
    'train.eval_every',
    'train.eval_examples',
    'train.max_to_keep',
    'train.overwrite',
    'train.progress',
    'train.num_threads',
    'train.num_devices',
    'train.multi_host',
    'data.data_dir',
    'data.split',
    'data.batch_size',
    'data.num_examples',
    'eval',
    'sweep',
)


def _flatten(tree: Any, prefix: str = '') -> Dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f'{prefix}.{k}' if prefix else k))
  return out


def _resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in RESUMABLE_FIELDS)


def config_differences(stored: Dict[str, Any],
                       current: ml_collections.ConfigDict) -> List[str]:
  """'field: stored -> current' for every non-resumable field that differs."""
  old = dict(_DEFAULTS_OF_NEWER_FIELDS, **_flatten(stored))
  new = _flatten(json.loads(current.to_json_best_effort()))
  return [f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
          for k in sorted(set(old) | set(new))
          if not _resumable(k) and old.get(k) != new.get(k)]


# config.model fields that say where weights come from or how they are
# computed with, not what the model is: evaluation may set them freely (say,
# a float32 run evaluated in bfloat16).
_NOT_ARCHITECTURE_FIELDS = ('init_from', 'random_init', 'dtype')
# Fields added after runs were saved: a stored config without one had the
# default, so resuming such a run is not refused for it.
_DEFAULTS_OF_NEWER_FIELDS = {'model.dtype': 'float32'}


class Checkpointer:
  """Periodic saves of the train state under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, save_every: int, max_to_keep: int):
    if save_every <= 0 or max_to_keep <= 0:
      raise ValueError(
          f'train.checkpoint_every ({save_every}) and train.max_to_keep '
          f'({max_to_keep}) must be > 0.')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every,
            create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Dict[str, Any],
           config: ml_collections.ConfigDict, force: bool = False,
           model_meta: Optional[Dict[str, Any]] = None) -> bool:
    """Saves at multiples of save_every (any step with force); async.

    Args:
      step: the step the state is at (= the data position).
      state: the train state.
      config: the run's config (compared on resume).
      force: save even if step is not a multiple of save_every.
      model_meta: {'architecture', 'model', 'data'} so that the checkpoint
        can be evaluated without the config's init_from (see load_for_eval).
    """
    meta = dict(config=json.loads(config.to_json_best_effort()),
                data_position=step, **(model_meta or {}))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                             force=force)

  def restore(self, step: int, abstract_state: Any
              ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(state, meta) of `step`, leaves placed as abstract_state's shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def read_meta(self, step: int) -> Dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_or_init(workdir: str, config: ml_collections.ConfigDict,
                    init_fn: Callable[[], Dict[str, Any]]
                    ) -> Tuple[Dict[str, Any], int, Checkpointer]:
  """Resumes from the latest checkpoint of workdir, or starts a new run.

  Args:
    workdir: the run directory.
    config: the full config; config.train.checkpoint_every, max_to_keep and
      overwrite are read here.
    init_fn: () -> a fresh train state with the shardings training uses;
      also the restore target (its shapes, dtypes and shardings).

  Returns:
    (state, step, checkpointer): the restored or fresh state, the step it is
    at (the data position to resume from) and the open checkpointer.

  Raises:
    ValueError: the workdir holds a checkpoint of a different config.
  """
  tcfg = config.train
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if tcfg.overwrite and os.path.isdir(directory):
    shutil.rmtree(directory)
  ckpt = Checkpointer(workdir, save_every=tcfg.checkpoint_every,
                      max_to_keep=tcfg.max_to_keep)
  step = ckpt.latest_step()
  state = init_fn()
  if step is None:
    return state, 0, ckpt
  diffs = config_differences(ckpt.read_meta(step)['config'], config)
  if diffs:
    ckpt.close()
    raise ValueError(
        f'{directory} holds a checkpoint (step {step}) of a different config; '
        'differing fields:\n  ' + '\n  '.join(diffs) +
        '\nUse another --workdir, or pass --restart '
        '(config.train.overwrite=True) to delete it and start over.')
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  state, meta = ckpt.restore(step, abstract)
  return state, int(meta['data_position']), ckpt


def latest_step(workdir: str) -> Optional[int]:
  """The newest finished training step saved in workdir, or None."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def load_for_eval(workdir: str, config: Optional[ml_collections.ConfigDict],
                  step: Optional[int] = None) -> Tuple[Any, Any, Dict[str, Any]]:
  """(model, params, prep) of a training checkpoint, for evaluation.

  The architecture is the one stored with the checkpoint. When `config` is
  given, its model block must describe the same architecture (fields that
  only say where weights came from, or the compute dtype, are not
  compared), so that evaluating a workdir with another experiment's config
  fails loudly. The model is returned in float32; callers apply
  config.model.dtype (lvtp_jax.models.with_dtype).

  Args:
    workdir: a train.py run directory.
    config: the evaluation config, or None to skip the check.
    step: the step to load (default: the latest).

  Returns:
    (model, params, prep): the Segmenter, its parameters (host arrays) and
    dict(mean, std) in 0..1 units.
  """
  from lvtp_jax import models  # pylint: disable=g-import-not-at-top
  step = latest_step(workdir) if step is None else step
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if step is None:
    raise FileNotFoundError(f'{directory} holds no checkpoint; train first.')
  manager = ocp.CheckpointManager(directory)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    if 'model' not in meta:
      raise ValueError(f'{directory}/{step} was written by an older version '
                       'without the model description; retrain.')
    if config is not None:
      stored = {k: v for k, v in meta['config']['model'].items()
                if k not in _NOT_ARCHITECTURE_FIELDS}
      current = {k: v for k, v in json.loads(
          config.model.to_json_best_effort()).items()
                 if k not in _NOT_ARCHITECTURE_FIELDS}
      diffs = [f'model.{k}: {stored.get(k, "<absent>")!r} -> '
               f'{current.get(k, "<absent>")!r}'
               for k in sorted(set(stored) | set(current))
               if stored.get(k) != current.get(k)]
      if diffs:
        raise ValueError(
            f'{directory} (step {step}) was trained with another model '
            'config; differing fields:\n  ' + '\n  '.join(diffs) +
            '\nEvaluate it with the config it was trained with, or use '
            'another --workdir.')
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()
  model = models.build(meta['architecture'], meta['model'])
  params = jax.tree.map(np.asarray, state['params'])
  return model, params, dict(meta['data'])


def load_weights(path: str) -> Tuple[Any, Any, Dict[str, Any]]:
  """(model, params, prep) of config.model.init_from: a train.py workdir
  (its latest checkpoint, load_for_eval) or a converted directory
  (python -m lvtp_jax.convert; lvtp_jax.pretrained.load)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return load_for_eval(path, None)
  from lvtp_jax import pretrained  # pylint: disable=g-import-not-at-top
  model, params, meta = pretrained.load(path)
  return model, params, meta['data']
