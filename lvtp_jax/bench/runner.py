"""The accelerator suite's sections: what each group builds, checks and times.

`Suite(sizes, ...)` runs the classification, training and segmentation
groups of lvtp_jax/bench/settings.py at one set of sizes and collects one
row per measured thing (lvtp_jax/bench/suite.py is the command around it,
report.py turns the rows into tables). Every group compiles its programs
once (`.lower().compile()`, whose cost analysis gives the realized FLOPs),
checks that the outputs are finite (and, for DeiT, equal to timm's), then
times all of its rows interleaved.
"""

import copy
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvtp_jax import models
from lvtp_jax import pruning
from lvtp_jax.bench import settings
from lvtp_jax.bench import timm_compare
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.pruning import inblock
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import optim
from lvtp_jax.train import step as step_lib

# The 'vit' normalisation (LVTP-R reads pixels through it).
_NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# ours vs timm on the same weights: relative logit error above which the
# two sides do not compute the same function (TF32 and bfloat16 included).
_AGREEMENT = {'float32': 1e-2, 'bfloat16': 1e-1}


class Suite:
  """Runs the sections at one set of sizes and collects the rows."""

  def __init__(self, sizes: settings.Sizes, *, math: Dict[str, str],
               peaks: Optional[Dict[str, float]], budget_s: Optional[float],
               torch_rows: bool, log: Callable[[str], None],
               on_group: Callable[[], None] = lambda: None):
    self.sizes = sizes
    self.math = math            # dtype -> 'bfloat16' | 'tf32' | 'float32'
    self.peaks = peaks
    self.budget_s = budget_s
    self.torch_rows = torch_rows
    self.log = log
    self.on_group = on_group
    self.rows: List[Dict[str, Any]] = []
    self.skipped: List[str] = []
    self.t0 = time.perf_counter()
    self.rng = np.random.default_rng(0)

  # -------------------------------------------------------------------------
  # Shared steps.
  # -------------------------------------------------------------------------

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def _group(self, name: str, run: Callable[[], None]) -> None:
    if self.budget_s is not None and self.elapsed() > self.budget_s:
      self.log(f'skipped (time budget {self.budget_s:.0f} s spent): {name}')
      self.skipped.append(name)
      return
    self.log(name)
    run()
    self.on_group()

  def _compile(self, label: str, fn: Callable, *args):
    """(compiled fn, compile seconds, XLA FLOPs) of jit(fn)(*args)."""
    self.log(f'  compiling {label}')
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t, _counted(
        lambda: flops.compiled_flops(compiled))

  def _time(self, calls: Dict[str, Callable[[], Any]]
            ) -> Dict[str, List[float]]:
    s = self.sizes
    self.log(f'  timing {", ".join(calls)} interleaved ({s.warmup} warm-up, '
             f'{s.rounds} rounds of {s.iters})')
    return speed.time_interleaved(calls, warmup=s.warmup, iters=s.iters,
                                  rounds=s.rounds)

  def _images(self, batch: int, size: int) -> np.ndarray:
    return self.rng.standard_normal((batch, size, size, 3)).astype(np.float32)

  def _mfu(self, gflops_per_image: float, images_per_second: float,
           dtype: str, passes: float = 1.0) -> Optional[float]:
    if not self.peaks or self.math[dtype] not in self.peaks:
      return None
    rate = passes * gflops_per_image * images_per_second / 1e3  # TFLOP/s
    return rate / self.peaks[self.math[dtype]]

  def _add(self, group: List[Dict[str, Any]], times: Dict[str, List[float]],
           batch: int, dtype: str, passes: float = 1.0) -> None:
    """Fills timing columns and ratios of a group's rows; adds them."""
    base = next((r for r in group if r['setting'] == 'unpruned'), None)
    timm = next((r for r in group if r['setting'] == 'timm eager'), None)
    for row in group:
      seconds = float(np.median(times[row['setting']]))
      row.update(images_per_second=batch / seconds,
                 ms_per_batch=1e3 * seconds,
                 round_ms=[1e3 * t for t in times[row['setting']]],
                 mfu=self._mfu(row['gflops_analytic'], batch / seconds,
                               dtype, passes))
    for row in group:
      ours = row['framework'] == 'lvtp_jax'
      if base is not None and ours and row is not base:
        row['speedup'] = row['images_per_second'] / base['images_per_second']
        if base['gflops_realized'] and row['gflops_realized']:
          row['realized_flop_ratio'] = (base['gflops_realized'] /
                                        row['gflops_realized'])
        # The model-FLOP ratio is the one to read on GPUs: XLA's GPU cost
        # analysis leaves out the matmuls it hands to cuBLAS (report.py).
        if base.get('gflops_analytic') and row.get('gflops_analytic'):
          row['model_flop_ratio'] = (base['gflops_analytic'] /
                                     row['gflops_analytic'])
      if timm is not None and ours:
        row['vs_timm'] = row['images_per_second'] / timm['images_per_second']
    self.rows.extend(group)

  # -------------------------------------------------------------------------
  # Sections.
  # -------------------------------------------------------------------------

  def classification(self) -> None:
    s = self.sizes
    for name in s.deit_models:
      pair = {}
      for dtype in s.deit_dtypes:
        self._group(f'classification: {name}, {dtype}, batch {s.deit_batch}',
                    lambda: self._classification_group(name, dtype, pair))

  def _classification_group(self, name: str, dtype: str,
                            pair: Dict[str, Any]) -> None:
    s = self.sizes
    if not pair:  # the timm module, our model and the images, once per model
      if self.torch_rows:
        ref, model, params = timm_compare.reference_pair(name, s.deit_img)
      else:
        ref, (model, params) = None, random_vit(name, s.deit_img, self.rng)
      x = self._images(s.deit_batch, s.deit_img)
      pair.update(ref=ref, model=model, params=jax.device_put(params), x=x,
                  x_dev=jax.device_put(jnp.asarray(x)), ref_logits=None)
    model, params, x_dev = pair['model'], pair['params'], pair['x_dev']
    hw = (s.deit_img, s.deit_img)
    common = dict(section='classification', model=name, dtype=dtype,
                  math=self.math[dtype], batch=s.deit_batch,
                  img_size=s.deit_img)
    group, calls = [], {}
    if self.torch_rows:
      for trow in settings.TORCH_ROWS:
        module = (trow.patch(copy.deepcopy(pair['ref'])) if trow.patch
                  else pair['ref'])
        call, logits = timm_compare.torch_forward(module, pair['x'], dtype)
        if pair['ref_logits'] is None and trow.patch is None:
          # The float32 timm logits every row of this model is checked on.
          _, ref_logits = timm_compare.torch_forward(module, pair['x'],
                                                     'float32')
          pair['ref_logits'] = ref_logits()
        calls[trow.name] = call
        group.append(dict(common, setting=trow.name, framework='torch',
                          source=trow.source, gflops_realized=None,
                          gflops_analytic=2 * float(flops.vit_macs(
                              model, hw)) / 1e9, compile_s=None))
        if trow.patch is None:
          group[-1]['rel_error_vs_timm_fp32'] = timm_compare.relative_error(
              logits(), pair['ref_logits'])
    for setting in settings.CLASSIFICATION:
      pruned = pruning.attach(models.with_dtype(model, dtype),
                              setting.pruning or None)
      apply = lambda p, im, m=pruned: m.apply({'params': p}, im)
      compiled, compile_s, xla = self._compile(setting.name, apply, params,
                                               x_dev)
      logits = np.asarray(compiled(params, x_dev))
      if not np.isfinite(logits).all():
        raise FloatingPointError(f'{name} {dtype} {setting.name}: non-finite '
                                 'logits.')
      row = dict(common, setting=setting.name, framework='lvtp_jax',
                 policy=setting.pruning.get('name', 'none'),
                 source=setting.source, compile_s=compile_s,
                 gflops_realized=_per_image(xla, s.deit_batch),
                 gflops_analytic=_vit_gflops(pruned, hw))
      if pair['ref_logits'] is not None and not setting.pruning:
        err = timm_compare.relative_error(logits, pair['ref_logits'])
        row['rel_error_vs_timm_fp32'] = err
        if err > _AGREEMENT[dtype]:
          raise RuntimeError(
              f'{name} {dtype}: lvtp_jax logits differ from timm float32 by '
              f'{err:.3g} (relative), above {_AGREEMENT[dtype]}: the timing '
              'would compare different computations.')
      calls[setting.name] = (lambda c=compiled: c(params, x_dev)
                             .block_until_ready())
      group.append(row)
    self._add(group, self._time(calls), s.deit_batch, dtype)

  def segmentation(self) -> None:
    s = self.sizes
    for variant, shape in s.seg_models:
      for decoder in s.seg_decoders:
        for dtype in s.seg_dtypes:
          self._group(
              f'segmentation: Segmenter {variant} {decoder}, {dtype}, '
              f'{s.seg_img} px, batch {s.seg_batch}',
              lambda: self._segmentation_group(variant, shape, decoder,
                                               dtype))

  def _segmentation_group(self, variant: str, shape: Dict[str, int],
                          decoder: str, dtype: str) -> None:
    s = self.sizes
    model = seg_lib.Segmenter(
        num_classes=s.seg_classes, patch_size=16, img_size=s.seg_img,
        decoder=decoder, decoder_depth=2, aux_layers=s.seg_aux_layers,
        aux_head='linear', dtype=models.compute_dtype(dtype), **shape)
    x = jax.device_put(jnp.asarray(self._images(s.seg_batch, s.seg_img)))
    params = jax.device_put(random_params(model, s.seg_img, self.rng))
    hw = (s.seg_img, s.seg_img)
    group, calls = [], {}
    for setting in settings.SEGMENTATION:
      pruned = pruning.attach(model, setting.pruning or None,
                              normalization=_NORMALIZATION)
      apply = lambda p, im, m=pruned: m.apply({'params': p}, im)
      compiled, compile_s, xla = self._compile(setting.name, apply, params, x)
      out = np.asarray(compiled(params, x)[:, ::8, ::8])
      if not np.isfinite(out).all():
        raise FloatingPointError(f'{variant} {decoder} {dtype} '
                                 f'{setting.name}: non-finite logits.')
      spec = pruned.pruning
      row = dict(section='segmentation', model=f'Segmenter {variant}',
                 decoder=decoder, dtype=dtype, math=self.math[dtype],
                 batch=s.seg_batch, img_size=s.seg_img, setting=setting.name,
                 framework='lvtp_jax', policy=setting.pruning.get('name',
                                                                  'none'),
                 source=setting.source, compile_s=compile_s,
                 gflops_realized=_per_image(xla, s.seg_batch),
                 aux_layers=list(s.seg_aux_layers),
                 gflops_analytic=2 * float(flops.segmenter_effective_macs(
                     model, *_buffer_tokens(model, spec, hw),
                     dense_decoder=spec is not None and not spec.boundaries))
                 / 1e9)
      if spec is not None and spec.boundaries:   # an exit policy decides
        row.update(capacities=list(spec.capacities),
                   gflops_decisions=_counted(lambda m=pruned: (
                       pruning.decision_flops(m, hw, s.seg_batch) / 1e9)))
      calls[setting.name] = lambda c=compiled: c(params, x).block_until_ready()
      group.append(row)
    self._add(group, self._time(calls), s.seg_batch, dtype)

  def training(self) -> None:
    s = self.sizes
    variant, _ = s.train_model
    self._group(f'training: Segmenter {variant} mask transformer, '
                f'{s.train_img} px, batch {s.train_batch}, '
                f'{" and ".join(s.train_dtypes)}', self._training_group)

  def _training_group(self) -> None:
    s = self.sizes
    variant, shape = s.train_model
    config = _recipe_config()
    tx = optim.make_optimizer(config.train)
    schedule = optim.make_schedule(config.train)
    mesh = step_lib.make_mesh(1)
    labels = self.rng.integers(0, s.seg_classes, (s.train_batch, s.train_img,
                                                  s.train_img))
    labels[self.rng.random(labels.shape) < 0.05] = 255  # some ignored pixels
    batch = dict(image=jnp.asarray(self._images(s.train_batch, s.train_img)),
                 segmentation=jnp.asarray(labels, jnp.int32))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    group, calls = [], {}
    for dtype in s.train_dtypes:
      model = seg_lib.Segmenter(
          num_classes=s.seg_classes, patch_size=16, img_size=s.train_img,
          decoder='mask_transformer', decoder_depth=2, drop_path_rate=0.1,
          dtype=models.compute_dtype(dtype), **shape)
      params = random_params(model, s.train_img, self.rng)
      state = jax.device_put(dict(params=params, opt_state=tx.init(params),
                                  step=jnp.zeros((), jnp.int32),
                                  rng=jax.random.PRNGKey(0)), replicated)
      train_step = step_lib.make_train_step(model, tx, schedule, config, mesh)
      self.log(f'  compiling the {dtype} training step')
      t = time.perf_counter()
      state, metrics = train_step(state, batch)
      loss = float(metrics['loss'])
      compile_s = time.perf_counter() - t
      if not np.isfinite(loss):
        raise FloatingPointError(f'training step {dtype}: loss {loss}.')
      holder = dict(state=state)

      def call(holder=holder, train_step=train_step):
        holder['state'], m = train_step(holder['state'], batch)
        m['loss'].block_until_ready()

      calls[dtype] = call
      group.append(dict(
          section='training', model=f'Segmenter {variant}',
          decoder='mask_transformer', dtype=dtype, math=self.math[dtype],
          batch=s.train_batch, img_size=s.train_img, setting=dtype,
          framework='lvtp_jax', policy='none', compile_s=compile_s,
          first_loss=loss, gflops_realized=None,
          gflops_analytic=2 * float(flops.segmenter_macs(
              model, (s.train_img, s.train_img))) / 1e9,
          source='configs/segmenter_train.py ADE20K recipe for ViT-B: SGD '
                 'momentum 0.9, poly lr, drop-path 0.1; no input pipeline'))
    times = self._time(calls)
    for dtype in s.train_dtypes:
      self._add([r for r in group if r['dtype'] == dtype],
                {dtype: times[dtype]}, s.train_batch, dtype, passes=3.0)


def _counted(count: Callable[[], float]) -> Optional[float]:
  """XLA's FLOP count, or None (said in the row) where the backend has
  none for this program: a missing count must not stop a timing run."""
  try:
    return count()
  except RuntimeError:
    return None


def _per_image(flops_per_batch: Optional[float], batch: int
               ) -> Optional[float]:
  return None if flops_per_batch is None else flops_per_batch / batch / 1e9


def random_params(model, img_size: int, rng: np.random.Generator):
  """Random float32 parameters made on the host (no initialiser to compile,
  which on a GPU costs seconds per model): matrices, convolutions and
  embeddings N(0, 0.02) as timm initialises them, LayerNorm scales 1,
  biases 0."""
  x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']

  def draw(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return np.ones(leaf.shape, np.float32)
    if name == 'bias':
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_vit(name: str, img_size: int, rng: np.random.Generator):
  """(model, params) of a known timm architecture with random weights (the
  classification rows when PyTorch is not installed)."""
  fields = dict(timm_convert.model_config(name)['model'],
                img_size=img_size, num_classes=1000)
  model = vit_lib.ViT(**fields)
  return model, random_params(model, img_size, rng)


def _vit_gflops(model, hw) -> float:
  """Analytic GFLOPs per image of a ViT forward; with an in-block reduction,
  from its token counts (a function of the config alone: no forward)."""
  spec = getattr(model, 'pruning', None)
  if spec is None:
    return 2 * float(flops.vit_macs(model, hw)) / 1e9
  n = (hw[0] // model.patch_size) * (hw[1] // model.patch_size)
  counts = inblock.validate_counts(pruning.get(spec.name), spec.params,
                                   n + model.num_prefix, model.num_prefix,
                                   model.depth)
  return 2 * float(flops.vit_macs(model, hw, counts[:-1], counts[1:])) / 1e9


def _buffer_tokens(model, spec, hw) -> Tuple[np.ndarray, np.ndarray]:
  """[depth] patch tokens each encoder block, and its MLP, runs on with full
  buffers: N, or an in-block reduction's counts (a composed policy's up to
  its first boundary); from each exit boundary on, at most its capacity."""
  n = (hw[0] // model.patch_size) * (hw[1] // model.patch_size)
  p = model.num_prefix
  tokens = np.full((model.depth,), n, np.float64)
  if spec is None or spec.mode != 'buffer':
    return tokens, tokens.copy()
  reduction, params, depth = spec.reduction, spec.reduction_params, (
      spec.boundaries[0] - 1 if spec.boundaries else model.depth)
  if pruning.kind(spec.name) == 'reduce':
    reduction, params = spec.name, spec.params
  mlp = tokens.copy()
  if reduction:
    counts = np.asarray(inblock.validate_counts(
        pruning.get(reduction), params, n + p, p, depth), np.float64) - p
    tokens[:depth], mlp[:depth] = counts[:-1], counts[1:]
    tokens[depth:] = mlp[depth:] = counts[-1]
  for stage, layer in enumerate(spec.boundaries):
    cap = spec.capacity(stage, n)
    tokens[layer:] = np.minimum(tokens[layer:], cap)
    mlp[layer:] = np.minimum(mlp[layer:], cap)
  return tokens, mlp


def _recipe_config():
  """The ADE20K recipe of configs/segmenter_train.py, as config.train."""
  train = optim.config_defaults()
  train.update(dict(optimizer='sgd', lr=1e-3, end_lr=1e-5, power=0.9,
                    momentum=0.9, weight_decay=0.0, num_steps=160_000))
  train.aux_weight = 0.0
  train.aux_loss = 'pixel'
  return ml_collections.ConfigDict(dict(train=train))


SECTIONS = ('classification', 'training', 'segmentation')


def run_sections(suite: Suite, sections=SECTIONS) -> None:
  """The chosen sections, in the order that keeps the most under a time
  budget: the training step is one group, the segmentation section the
  longest."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f'unknown suite sections {unknown}; choose from '
                     f'{list(SECTIONS)}')
  for name in SECTIONS:
    if name in sections:
      getattr(suite, name)()
