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

import contextlib
import gc
import json
import os
import shutil
import sys
from typing import (Any, Callable, Dict, Iterable, List, Optional, Sequence,
                    Tuple)

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


def _with_newer_defaults(old: Dict[str, Any], new: Dict[str, Any],
                         section: str = '') -> Dict[str, Any]:
  """`old` (a stored config, flat keys below `section`, e.g. 'model.')
  with the defaults of the fields `new` has and it was saved without."""
  old = dict(old)
  for key, default in _DEFAULTS_OF_NEWER_FIELDS.items():
    field = key[len(section):]
    if key.startswith(section) and field in new and field not in old:
      old[field] = default
  return old


def config_differences(stored: Dict[str, Any],
                       current: ml_collections.ConfigDict) -> List[str]:
  """'field: stored -> current' for every non-resumable field that differs."""
  new = _flatten(json.loads(current.to_json_best_effort()))
  old = _with_newer_defaults(_flatten(stored), new)
  return [f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
          for k in sorted(set(old) | set(new))
          if not _resumable(k) and old.get(k) != new.get(k)]


# config.model fields that say where weights come from or how they are
# computed with, not what the model is: evaluation may set them freely (say,
# a float32 run evaluated in bfloat16).
_NOT_ARCHITECTURE_FIELDS = ('init_from', 'random_init', 'dtype')
# Fields added after runs were saved: a stored config without one had the
# default, so resuming such a run is not refused for it.
_DEFAULTS_OF_NEWER_FIELDS = {'model.dtype': 'float32',
                             'model.posemb': 'learn',
                             'pruning.dense': 'source'}


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
  """Resumes from the newest intact checkpoint of workdir, or starts a run.

  A step that cannot be read (emptied or truncated files, deleted
  manifests, shapes or dtypes the state does not have) is reported with
  its reason, moved aside to WORKDIR/checkpoints_damaged/ (never deleted)
  and the next older step is tried. Prints the step it resumed from.

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
    CheckpointError: every step in the workdir is damaged.
  """
  tcfg = config.train
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if tcfg.overwrite and os.path.isdir(directory):
    shutil.rmtree(directory)
  ckpt = Checkpointer(workdir, save_every=tcfg.checkpoint_every,
                      max_to_keep=tcfg.max_to_keep)
  state = init_fn()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)

  def read(step):
    diffs = config_differences(ckpt.read_meta(step)['config'], config)
    if diffs:
      raise _ConfigMismatch(
          f'{directory} holds a checkpoint (step {step}) of a different '
          'config; differing fields:\n  ' + '\n  '.join(diffs) +
          '\nUse another --workdir, or pass --restart '
          '(config.train.overwrite=True) to delete it and start over.')
    with _quiet_failed_reads():
      restored, meta = ckpt.restore(step, abstract)
    _check_like(restored, abstract)
    return restored, meta

  steps = ckpt.manager.all_steps()
  try:
    found = _newest_intact(workdir, directory, steps, read, (
        'pass --restart (config.train.overwrite=True) to start over',
        'or move a step back from checkpoints_damaged/ if you repaired it'))
  except Exception:
    ckpt.close()
    raise
  if found is None or found[0] != max(steps):
    ckpt.manager.reload()   # no step yet, or the newer ones were set aside
  if found is None:
    return state, 0, ckpt
  step, (restored, meta) = found
  print(f'resuming {workdir} from step {step}', flush=True)
  return restored, int(meta['data_position']), ckpt


@contextlib.contextmanager
def _quiet_failed_reads():
  """Orbax reads arrays in concurrent coroutines; when one fails, the rest
  are abandoned and each prints an 'Exception ignored' traceback with the
  whole TensorStore spec when collected (tens of thousands of lines). The
  failure itself is raised and reported by the caller; these are dropped."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = hook


class CheckpointError(RuntimeError):
  """No intact checkpoint where one was expected."""


class _ConfigMismatch(ValueError):
  """The checkpoint is intact but not of this config: refused, not set
  aside."""


# Set aside rather than deleted: a human may still repair or inspect it.
DAMAGED_DIR = 'checkpoints_damaged'


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  first = text[0] if text else ''
  for noise in (' See full TensorStore', ' [tensorstore_spec='):
    first = first.partition(noise)[0]   # kilobytes of store specs
  return f'{type(e).__name__}: {first[:300]}'


def _set_aside(directory: str, step: int, e: BaseException) -> str:
  """Moves checkpoints/<step> to checkpoints_damaged/<step>[.n], writes
  the reason beside it, reports it; returns 'step N: reason'."""
  reason = _reason(e)
  source = os.path.join(directory, str(step))
  target = os.path.join(os.path.dirname(directory), DAMAGED_DIR, str(step))
  n = 0
  while os.path.exists(target + (f'.{n}' if n else '')):
    n += 1
  target += f'.{n}' if n else ''
  if jax.process_index() == 0 and os.path.isdir(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    with open(os.path.join(target, 'DAMAGED.txt'), 'w') as f:
      f.write(reason + '\n')
  print(f'checkpoint step {step} of {directory} is unreadable ({reason}); '
        f'moved it to {target}; trying an older step.', file=sys.stderr,
        flush=True)
  return f'step {step}: {reason}'


def _none_intact(workdir: str, tried: List[str], choices) -> str:
  return (f'no intact checkpoint in {workdir}; tried, newest first (each '
          f'moved to {os.path.join(workdir, DAMAGED_DIR)}):\n  ' +
          '\n  '.join(tried) + '\nChoices: ' + '; '.join(choices) + '.')


def _newest_intact(workdir: str, directory: str, steps: Iterable[int],
                   read: Callable[[int], Any], choices: Sequence[str]
                   ) -> Optional[Tuple[int, Any]]:
  """(step, read(step)) of the newest step that reads; None when there is
  no step at all.

  Steps are tried newest first. A step whose `read` raises is set aside
  (_set_aside: moved to checkpoints_damaged/, the reason reported) and the
  next older one is tried; a _ConfigMismatch (an intact checkpoint of
  another config) is raised as it is.

  Raises:
    CheckpointError: every step was set aside; `choices` say what to do.
  """
  tried = []
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step)
    except _ConfigMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except
      tried.append(_set_aside(directory, step, e))
  if tried:
    raise CheckpointError(_none_intact(workdir, tried, choices))
  return None


def _check_like(tree: Any, abstract: Any) -> None:
  """Raises ValueError when a restored leaf's shape or dtype differs."""
  got = jax.tree_util.tree_leaves_with_path(tree)
  want = jax.tree_util.tree_leaves_with_path(abstract)
  if len(got) != len(want):
    raise ValueError(f'{len(got)} arrays stored, the state has {len(want)}.')
  for (path, a), (_, b) in zip(got, want):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f'{jax.tree_util.keystr(path)} is {a.dtype}'
                       f'{list(a.shape)}, the state needs {b.dtype}'
                       f'{list(b.shape)}.')


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
  """(model, params, prep) of one training checkpoint, for evaluation.

  The architecture is the one stored with the checkpoint. When `config` is
  given, its model block must describe the same architecture (fields that
  only say where weights came from, or the compute dtype, are not
  compared), so that evaluating a workdir with another experiment's config
  fails loudly. The model is returned in float32; callers apply
  config.model.dtype (lvtp_jax.models.with_dtype).

  Args:
    workdir: a train.py run directory.
    config: the evaluation config, or None to skip the check.
    step: the step to load (default: the newest intact one, load_latest).

  Returns:
    (model, params, prep): the model, its parameters (host arrays) and
    dict(mean, std) in 0..1 units.
  """
  if step is None:
    found = load_latest(workdir, config)
    if found is None:
      raise FileNotFoundError(
          f'{os.path.join(os.path.abspath(workdir), "checkpoints")} holds no '
          'checkpoint; train first.')
    return found[:3]
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(directory)
  try:
    meta = _read_eval_meta(manager, directory, step, config)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()
  return _eval_model(meta, state)


def load_latest(workdir: str, config: Optional[ml_collections.ConfigDict]
                ) -> Optional[Tuple[Any, Any, Dict[str, Any], int]]:
  """(model, params, prep, step) of workdir's newest intact checkpoint.

  None when workdir has no checkpoint at all. A step that cannot be read
  is reported, moved aside to WORKDIR/checkpoints_damaged/ and the next
  older one tried, as when training resumes; a config whose model differs
  from the stored one is refused (ValueError), not treated as damage.

  Raises:
    CheckpointError: every step is damaged.
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)

  def read(step):
    meta = _read_eval_meta(manager, directory, step, config)
    with _quiet_failed_reads():
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))['state']
    return _eval_model(meta, state)

  try:
    found = _newest_intact(workdir, directory, manager.all_steps(), read, (
        'train again (python train.py with --restart starts over)',
        'or point --workdir / config.model.init_from at another run'))
  finally:
    manager.close()
  if found is None:
    return None
  step, (model, params, prep) = found
  return model, params, prep, step


def _read_eval_meta(manager, directory: str, step: int,
                    config: Optional[ml_collections.ConfigDict]
                    ) -> Dict[str, Any]:
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  if 'model' not in meta:
    raise _ConfigMismatch(
        f'{directory}/{step} was written by an older version without the '
        'model description; retrain.')
  if config is not None:
    stored = {k: v for k, v in meta['config']['model'].items()
              if k not in _NOT_ARCHITECTURE_FIELDS}
    current = {k: v for k, v in json.loads(
        config.model.to_json_best_effort()).items()
               if k not in _NOT_ARCHITECTURE_FIELDS}
    stored = _with_newer_defaults(stored, current, 'model.')
    diffs = [f'model.{k}: {stored.get(k, "<absent>")!r} -> '
             f'{current.get(k, "<absent>")!r}'
             for k in sorted(set(stored) | set(current))
             if stored.get(k) != current.get(k)]
    if diffs:
      raise _ConfigMismatch(
          f'{directory} (step {step}) was trained with another model '
          'config; differing fields:\n  ' + '\n  '.join(diffs) +
          '\nEvaluate it with the config it was trained with, or use '
          'another --workdir.')
  return meta


def _eval_model(meta: Dict[str, Any], state: Dict[str, Any]):
  """(model, params, prep); raises when the stored parameters do not fit
  the stored architecture (a damaged or foreign checkpoint)."""
  from lvtp_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build(meta['architecture'], meta['model'])
  params = jax.tree.map(np.asarray, state['params'])
  size = model.img_size
  want = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  _check_like(params, want['params'])
  return model, params, dict(meta['data'])


def load_weights(path: str) -> Tuple[Any, Any, Dict[str, Any]]:
  """(model, params, prep) of config.model.init_from: a train.py workdir
  (its latest checkpoint, load_for_eval) or a converted directory
  (python -m lvtp_jax.convert; lvtp_jax.pretrained.load)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    found = load_latest(path, None)
    if found is None:
      raise FileNotFoundError(
          f'config.model.init_from={path} is a training workdir without a '
          'checkpoint; train it first or point init_from elsewhere.')
    print(f'init_from: {path}/checkpoints/{found[3]}', flush=True)
    return found[:3]
  from lvtp_jax import pretrained  # pylint: disable=g-import-not-at-top
  model, params, meta = pretrained.load(path)
  return model, params, meta['data']


def random_weights_requested(config: ml_collections.ConfigDict) -> bool:
  """config.eval.random_weights: the one way to score random weights."""
  return bool(config.get('eval') and config.eval.get('random_weights', False))


def nothing_to_evaluate(workdir: Optional[str], convert_hint: str
                        ) -> ValueError:
  """The error of an evaluation that has no weights to score."""
  where = (f'--workdir {workdir} does not exist' if workdir and
           not os.path.isdir(workdir) else
           f'{workdir or "the workdir"} holds no training checkpoint')
  return ValueError(
      f'nothing to evaluate: {where} and config.model.init_from is empty. '
      'Check the --workdir path, train first (python train.py with the same '
      f'--config and --workdir), or point --config.model.init_from at '
      f'{convert_hint}. To score random weights on purpose (smoke tests, '
      'speed), pass --config.eval.random_weights=True.')

