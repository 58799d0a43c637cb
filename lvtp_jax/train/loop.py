"""Segmentation training: `train_and_evaluate(config, workdir)`.

One jitted step (step.py) over a ('data',) mesh of all devices: the batch
is sharded along the data axis, the train state is replicated, and XLA
inserts the gradient all-reduce. The state is donated, so a step updates it
in place. config.model.dtype='bfloat16' computes the forward and backward
in bfloat16 with float32 parameters, optimizer state and losses.

Loss = pixel cross-entropy of the final logits (ignore 255)
       + train.aux_weight * sum_k loss of aux head k, by train.aux_loss:
  'pixel' (default) the head's token map upsampled bilinearly to the label
          size, exactly as the final one, and pixel cross-entropy: the
          official DToP rule (its heads' mask losses are on masks upsampled
          to label size); on the quickstart model every pruning policy
          loses 0.4-0.8 mIoU less with it than with 'token'
          (docs/quickstart_seg.md);
  'token' cross-entropy of the head's per-token logits against the majority
          label of each patch (lvtp_jax.train.losses.token_targets).
Drop-path draws from
fold_in(rng, step), so a resumed run draws what an uninterrupted one would.

Written to WORKDIR: checkpoints/ (lvtp_jax.train.checkpoint), metrics.jsonl
(one line per log interval: step, losses averaged over the interval, lr,
images/s; the first interval includes compilation; and every
train.eval_every steps a line with eval_miou, eval_boundary_miou and
eval_pixel_accuracy on the first train.eval_examples validation images),
config.json and, at the end, results.json (the rows of
lvtp_jax.evaluation.segmentation for every setting of config.sweep).
Loss values are fetched at log and checkpoint steps only (no per-step host
sync); a non-finite loss stops the run naming its first bad step and the
last checkpoint, which is never one saved after that step.
"""

import functools
import json
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lvtp_jax import pretrained
from lvtp_jax import pruning
from lvtp_jax.data import segmentation as seg_data
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import plots
from lvtp_jax.evaluation import results
from lvtp_jax.evaluation import seg_runner
from lvtp_jax.evaluation import segmentation as seg_eval
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.train import checkpoint
from lvtp_jax.train import model_init
from lvtp_jax.train import optim
from lvtp_jax.train.step import AUX_LOSSES
from lvtp_jax.train.step import make_mesh
from lvtp_jax.train.step import make_train_step

def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError naming an out-of-range training field and the fix."""
  t, d, m = config.train, config.data, config.model
  optim.validate(t)
  if t.batch_size <= 0 or t.batch_size % num_devices:
    raise ValueError(
        f'train.batch_size={t.batch_size} must be a positive multiple of the '
        f'number of devices ({num_devices}).')
  if t.aux_weight < 0:
    raise ValueError(f'train.aux_weight={t.aux_weight} must be >= 0.')
  if t.get('aux_loss', 'pixel') not in AUX_LOSSES:
    raise ValueError(f'train.aux_loss={t.aux_loss!r} is not one of '
                     f'{AUX_LOSSES}.')
  if t.get('eval_every', 0) < 0 or t.get('eval_examples', 0) < 0:
    raise ValueError(f'train.eval_every={t.eval_every} and train.eval_examples'
                     f'={t.eval_examples} must be >= 0 (0: at the end only / '
                     'all images).')
  if t.log_every <= 0:
    raise ValueError(f'train.log_every={t.log_every} must be > 0.')
  if not m.aux_layers and t.aux_weight:
    logging.warning('train.aux_weight=%s but model.aux_layers is empty.',
                    t.aux_weight)
  if not 0 <= m.drop_path_rate < 1:
    raise ValueError(f'model.drop_path_rate={m.drop_path_rate} not in [0, 1).')
  if d.crop_size <= 0:
    raise ValueError(f'data.crop_size={d.crop_size} must be > 0.')
  pcfg = pruning.resolve(config.get('pruning'))
  if pcfg.name != 'none' and pcfg.aux_source != 'aux_heads':
    raise ValueError(
        f"config.pruning.aux_source={pcfg.aux_source!r} is an inference-time "
        "proxy for models without auxiliary heads; train with 'aux_heads' "
        '(phase 2 fine-tunes the auxiliary heads the policy exits at).')
  if pcfg.name != 'none' and pcfg.mode == 'buffer' and pcfg.calibrate.images:
    raise ValueError(
        'config.pruning.calibrate is an evaluation procedure; a training run '
        'in buffer mode needs config.pruning.capacities (or use masked mode).')


def _prepare_synthetic(config: ml_collections.ConfigDict) -> None:
  """Builds synthetic_scenes[/config] under data.data_dir if it is missing."""
  name = config.data.name
  if not name.startswith('synthetic_scenes'):
    return
  from lvtp_jax.data import synthetic_scenes  # pylint: disable=g-import-not-at-top
  synthetic_scenes.prepare(config.data.data_dir or None,
                           config=name.partition('/')[2] or 'default')


class _MetricsLog:
  """Accumulates device metrics between host syncs; writes metrics.jsonl."""

  def __init__(self, workdir: str, batch_size: int, checkpointer):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.batch_size = batch_size
    self.checkpointer = checkpointer
    self.pending: List[Dict[str, Any]] = []
    self.first_step = 0
    self.t0 = time.perf_counter()

  def add(self, step: int, metrics: Dict[str, Any]) -> None:
    if not self.pending:
      self.first_step = step
    self.pending.append(metrics)

  def flush(self, write: bool) -> Dict[str, float]:
    """Fetches pending metrics, stops on a non-finite loss, logs the mean."""
    if not self.pending:
      return {}
    fetched = jax.device_get(self.pending)
    loss = np.array([m['loss'] for m in fetched])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
      self.checkpointer.wait_until_finished()
      good = self.checkpointer.latest_step()
      workdir = os.path.dirname(self.checkpointer.directory)
      raise FloatingPointError(
          f'loss is {loss[bad[0]]} at step {self.first_step + bad[0] + 1}; '
          f'last good checkpoint: step {good} in '
          f'{self.checkpointer.directory}. A changed train.lr or '
          'train.grad_clip_norm is another config, so this workdir will not '
          'resume with it. Either start over here: add --restart and e.g. '
          '--config.train.lr=<lower> to the command (the checkpoints are '
          'deleted, metrics.jsonl kept aside)' + (
              '.' if good is None else
              '; or continue from the last good weights in a new workdir, '
              'with a fresh optimizer and schedule: --workdir <new> '
              f'--config.model.init_from={workdir} --config.train.lr=<lower>.'
          ))
    elapsed = time.perf_counter() - self.t0
    row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    row['lr'] = float(fetched[-1]['lr'])
    row['step'] = self.first_step + len(fetched)
    row['images_per_second'] = len(fetched) * self.batch_size / elapsed
    if write and jax.process_index() == 0:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    self.pending, self.t0 = [], time.perf_counter()
    return row


def _periodic_eval(config, model, params, prep, step: int, path: str
                   ) -> Dict[str, float]:
  """Quality on the first train.eval_examples validation images -> jsonl."""
  quick = ml_collections.ConfigDict(config.to_dict())
  quick.eval.progress = False
  result, _, _, num, _ = seg_runner.run_split(
      quick, model, params, prep, num_examples=config.train.eval_examples)
  row = dict(step=step, eval_images=num, eval_miou=result['miou'],
             eval_boundary_miou=result['boundary_miou'],
             eval_pixel_accuracy=result['pixel_accuracy'])
  append_jsonl(path, row)
  return row


def append_jsonl(path: str, row: Dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def start_run(config: ml_collections.ConfigDict, workdir: str,
              validate: Callable[[ml_collections.ConfigDict, int], None]
              ) -> jax.sharding.Mesh:
  """The start of a training run: jax.distributed when config.train.
  multi_host, the ('data',) mesh, `validate(config, number of devices)`
  and the workdir. Shared by segmentation and classification training."""
  if config.train.multi_host:
    if config.train.num_devices:
      raise ValueError('train.num_devices must be 0 (all) with multi_host.')
    jax.distributed.initialize()
  mesh = make_mesh(config.train.num_devices)
  validate(config, mesh.size)
  os.makedirs(workdir, exist_ok=True)
  return mesh


def start_state(config: ml_collections.ConfigDict, workdir: str, params: Any,
                tx, mesh) -> Tuple[Dict[str, Any], int, checkpoint.Checkpointer]:
  """(state, start step, checkpointer): a fresh train state replicated on
  `mesh`, or the one of workdir's latest checkpoint (same config); writes
  workdir/config.json. Shared by segmentation and classification training."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def init_state():
    state = dict(params=params, opt_state=tx.init(params),
                 step=jnp.zeros((), jnp.int32),
                 rng=jax.random.PRNGKey(config.seed))
    return jax.device_put(state, replicated)

  state, start, ckpt = checkpoint.restore_or_init(workdir, config, init_state)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    start_metrics(os.path.join(workdir, 'metrics.jsonl'), start,
                  restart=config.train.overwrite)
  return state, start, ckpt


def start_metrics(path: str, start: int, restart: bool) -> None:
  """Makes metrics.jsonl describe one run from step `start` on.

  A restart (--restart) moves the old file aside to
  metrics.<time>.jsonl and starts a new one; a resume drops the rows of
  steps after `start`, which the run is about to replay, so that no step
  is written twice, and a line torn by a kill mid-write.
  """
  if not os.path.exists(path):
    return
  if restart:
    kept = path[:-len('.jsonl')] + time.strftime('.%Y%m%d-%H%M%S.jsonl')
    os.replace(path, kept)
    print(f'--restart: the previous metrics are in {kept}', flush=True)
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines
          if _row_step(line) is not _TORN and (
              _row_step(line) is None or _row_step(line) <= start)]
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


_TORN = object()


def _row_step(line: str):
  try:
    return json.loads(line).get('step')
  except (json.JSONDecodeError, AttributeError):
    return _TORN   # a torn last line (the process died while writing)


class _Preemption:
  """SIGTERM / SIGINT during training: finish the step, save, exit.

  The first signal sets `signum`; the loop then saves a checkpoint at the
  current step (or lets the save in flight finish), prints how to resume
  and exits with status 128 + signal (143 for SIGTERM, 130 for Ctrl-C). A
  second signal exits at once. Handlers are installed only in the main
  thread (Python delivers signals there) and restored afterwards.
  """

  def __init__(self):
    self.signum = None
    self.previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signum is not None:
      print(f'\n{name} again: exiting now, without waiting for the '
            'checkpoint (the previous one is intact).', file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    print(f'\n{name}: saving a checkpoint after this step, then exiting '
          f'(send {name} again to exit at once).', file=sys.stderr,
          flush=True)


def _resume_command() -> str:
  args = [a for a in sys.argv
          if a not in ('--restart', '--config.train.overwrite=True')]
  return shlex.join(['python'] + args)


def run_steps(config: ml_collections.ConfigDict, workdir: str, *,
              state: Dict[str, Any], start: int,
              ckpt: checkpoint.Checkpointer, mesh, train_step,
              batches: Iterator[Dict[str, np.ndarray]],
              model_meta: Dict[str, Any],
              quick_eval: Callable[[Any, int, str], str],
              postfix: Callable[[Dict[str, float]], Dict[str, str]]
              ) -> Dict[str, Any]:
  """Steps start..train.num_steps: progress bar, metrics.jsonl every
  train.log_every steps, quick_eval(params, step, metrics path) -> a line
  to print every train.eval_every steps, checkpoints; closes `batches` and
  the checkpointer. Returns the final state."""
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  to_global = functools.partial(jax.make_array_from_process_local_data,
                                batch_sharding)
  num_steps = config.train.num_steps
  eval_every = config.train.get('eval_every', 0)
  log = _MetricsLog(workdir, config.train.batch_size, ckpt)
  bar = tqdm.tqdm(total=num_steps, initial=start, unit='step', file=sys.stderr,
                  disable=not config.train.progress or jax.process_index())
  preemption = _Preemption()
  try:
    with preemption:
      for step in range(start, num_steps):
        batch = jax.tree.map(to_global, next(batches))
        state, metrics = train_step(state, batch)
        log.add(step, metrics)
        done = step + 1
        bar.update(1)
        save = ckpt.manager.should_save(done) or done == num_steps
        stop = preemption.signum is not None
        if save or stop or done % config.train.log_every == 0:
          bar.set_postfix(**postfix(log.flush(write=True)))
        if (eval_every and done % eval_every == 0 and done != num_steps
            and not stop):
          bar.write(quick_eval(state['params'], done, log.path))
        stop = preemption.signum is not None
        if save or (stop and ckpt.latest_step() != done):
          ckpt.save(done, state, config, force=True, model_meta=model_meta)
        if stop:
          ckpt.wait_until_finished()
          bar.close()
          name = signal.Signals(preemption.signum).name
          print(f'{name}: saved step {done} in {ckpt.directory}. To resume, '
                f'run the same command again:\n  {_resume_command()}',
                file=sys.stderr, flush=True)
          raise SystemExit(128 + preemption.signum)
      ckpt.wait_until_finished()
  finally:
    bar.close()
    ckpt.close()
    if hasattr(batches, 'close'):
      batches.close()
  return state


def train(config: ml_collections.ConfigDict, workdir: str
          ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any]]:
  """Trains config's Segmenter in workdir, resuming from its checkpoint.

  Args:
    config: experiment config (configs/quickstart.py shows every field).
    workdir: run directory.

  Returns:
    (model, params, prep): the Segmenter, its trained parameters (host
    arrays) and the image normalisation (mean, std in 0..1) it was trained
    with.
  """
  mesh = start_run(config, workdir, validate)
  _prepare_synthetic(config)
  model, params, prep, initialised = model_init.build(config.model,
                                                      config.seed)
  # Phase 2 of DToP: the policy runs live in the training forward.
  train_model = pruning.attach(model, config.get('pruning'),
                               normalization=prep)
  if initialised:
    logging.warning('initialised (not in %s): %s', config.model.init_from,
                    initialised)
  dataset = segmentation_datasets.get_dataset(config.data.name)
  if dataset.num_classes != model.num_classes:
    raise ValueError(f'{config.data.name} has {dataset.num_classes} classes '
                     f'but the model predicts {model.num_classes}.')
  if config.data.crop_size % model.patch_size:
    raise ValueError(f'data.crop_size={config.data.crop_size} must be a '
                     f'multiple of the patch size {model.patch_size}.')

  model_meta = dict(architecture='segmenter',
                    model=pretrained.module_fields(model), data=dict(prep))
  tx = optim.make_optimizer(config.train)
  schedule = optim.make_schedule(config.train)
  state, start, ckpt = start_state(config, workdir, params, tx, mesh)
  train_step = make_train_step(train_model, tx, schedule, config, mesh)
  source = segmentation_datasets.open_segmentation_source(
      config.data.name, config.data.train_split, config.data.data_dir or None)
  batches = seg_data.train_batches(
      source, batch_size=config.train.batch_size,
      crop_size=config.data.crop_size, seed=config.seed, start_step=start,
      num_threads=config.train.num_threads,
      process_index=jax.process_index(), process_count=jax.process_count(),
      mean=tuple(255.0 * v for v in prep['mean']),
      std=tuple(255.0 * v for v in prep['std']),
      ratio_range=tuple(config.data.ratio_range),
      base_scale=tuple(config.data.get('base_scale', ())) or None,
      cat_max_ratio=config.data.get('cat_max_ratio', 0.75) or None,
      photometric=config.data.get('photometric', True))

  def quick_eval(params, step, path):
    row = _periodic_eval(config, model, params, prep, step, path)
    return f'step {step}: ' + ', '.join(
        f'{k} {v:.2f}' for k, v in row.items() if k != 'step')

  state = run_steps(
      config, workdir, state=state, start=start, ckpt=ckpt, mesh=mesh,
      train_step=train_step, batches=batches, model_meta=model_meta,
      quick_eval=quick_eval,
      postfix=lambda row: dict(loss=f'{row["loss"]:.4f}',
                               lr=f'{row["lr"]:.2e}',
                               img_s=f'{row["images_per_second"]:.1f}'))
  return model, jax.device_get(state['params']), prep


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """`train`, then evaluates the result and writes workdir/results.json.

  Returns:
    The content written to workdir/results.json.
  """
  model, params, prep = train(config, workdir)
  return write_results(config, workdir, seg_eval.evaluate_sweep(
      config, model, params, prep,
      weights=f'{workdir}/checkpoints/{config.train.num_steps}'))


def write_results(config: ml_collections.ConfigDict, workdir: str,
                  evaluated: Tuple[List[Dict[str, Any]], Any],
                  merge: bool = False) -> Dict[str, Any]:
  """The end of a training run: the (rows, visuals) of its final
  evaluation, each row marked with train_steps, into workdir/results.json
  (merged with the rows there when `merge`) and its figures."""
  rows, visuals = evaluated
  for row in rows:
    row['train_steps'] = config.train.num_steps
  if jax.process_index() == 0:
    out = results.write(workdir, rows, merge=merge)
    plots.write_figures(workdir, out['rows'], visuals)
    return out
  return dict(rows=rows)
