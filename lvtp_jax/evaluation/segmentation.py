"""mIoU / boundary mIoU of a Segmenter on a dataset, with FLOPs and throughput.

Two inference modes (config.eval.mode):
  whole  fixed-shape batches: every image (optionally resized, see
         config.eval.short_size) is padded to config.eval.size and the model
         runs once per batch; metrics at that resolution. For datasets of
         small fixed-size images (synthetic_scenes).
  slide  the official Segmenter protocol, one image at a time: resize the
         short side to config.eval.short_size (long side <= long_max),
         sliding windows (config.eval.window / stride), bilinear resize back,
         metrics at the original resolution (ADE20K, Cityscapes, PC).

FLOPs and throughput are per image. In 'whole' mode an image is one forward
at size x size; in 'slide' mode it is the average number of windows per image
times one window forward. images_per_second is measured on a batch of
forwards at that shape (size, or window) and divided by the windows per image;
the timed forward returns the label map (Segmenter labels=True: the
upsampling fuses with the argmax), gflops_realized counts the forward that
returns logits.

config.pruning (lvtp_jax.pruning) is attached per setting; pruning decisions
are made per forward (per window in 'slide' mode). A row (DESIGN §3) holds
name, policy, params (the policy's settings, capacities as used), miou,
boundary_miou, pixel_accuracy, per_class_iou, gflops_realized (XLA, per
image), gflops_effective (analytic, from the valid tokens of every forward,
averaged over the evaluated images), images_per_second, device,
stage_starts (first block of each stage) and tokens_per_stage (mean valid
slots, prefix included). Pruned rows add: speedup (images/s over the
unpruned model's, timed interleaved in the same process),
realized_flop_ratio (unpruned / pruned XLA FLOPs: the speed-up the
compiled program allows), gflops_decisions and decision_share (the policy's
own scoring and clustering, XLA-counted, and its share of gflops_realized),
capacity_per_stage (buffer slots), exit_fraction_per_stage and
decoder_fraction (fractions of the patches), overflow_tokens and
overflow_forwards (patches force-exited by the overflow rule, and the
forwards where it happened, out of `forwards`), calibration when the
capacities were measured (config.pruning.calibrate), and in 'whole' mode
token_accuracy (seg_runner: patch accuracy of the exited and the remaining
patches, pruned vs unpruned).
"""

from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvtp_jax import models
from lvtp_jax import pruning
from lvtp_jax.evaluation import seg_runner
from lvtp_jax.evaluation import speedup
from lvtp_jax.evaluation import sweeps
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.train import checkpoint
from lvtp_jax.train import model_init

# The official single-scale evaluation protocol per dataset: dataset ->
# (split, config.eval overrides). segm/eval/miou.py defaults: short side
# resized to the dataset's test scale, windows of the training crop with
# stride crop - 32 (../shared/specs/weights_and_data.md §2.6).
PROTOCOLS = {
    'ade20k': ('validation', dict(mode='slide', short_size=512, long_max=2048,
                                  window=512, stride=480)),
    'cityscapes': ('validation', dict(mode='slide', short_size=1024,
                                      long_max=2048, window=768, stride=736)),
    'pascal_context': ('validation', dict(mode='slide', short_size=520,
                                          long_max=4160, window=480,
                                          stride=448)),
    'synthetic_scenes': ('validation', dict(mode='whole', size=128,
                                            short_size=0, long_max=0)),
}


def protocol(dataset: str, crop: Optional[int] = None
             ) -> Tuple[str, Dict[str, Any]]:
  """(split, config.eval overrides) of PROTOCOLS[dataset].

  Args:
    dataset: a key of PROTOCOLS.
    crop: a training crop other than the dataset's default (Seg-L trains at
      640 on ADE20K): the window becomes crop, the stride crop - 32, and
      the short side at least crop.
  """
  if dataset not in PROTOCOLS:
    raise ValueError(f'dataset={dataset!r}; known: {sorted(PROTOCOLS)}.')
  split, overrides = PROTOCOLS[dataset]
  overrides = dict(overrides)
  if crop and overrides['mode'] == 'slide' and crop != overrides['window']:
    overrides.update(window=crop, stride=crop - 32,
                     short_size=max(crop, overrides['short_size']))
  return split, overrides


def build_model(config: ml_collections.ConfigDict, workdir: Optional[str] = None
                ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any], str]:
  """The model to evaluate and where its weights come from.

  In order of precedence:
    1. the latest training checkpoint in WORKDIR/checkpoints (a run of
       train.py with this config: eval.py evaluates what training produced);
    2. config.model.init_from, a converted Segmenter (python -m
       lvtp_jax.convert segmenter ...) or a training workdir;
    3. random weights, only when config.eval.random_weights is set (smoke
       tests, speed; a training config's model.random_init does not count);
       otherwise a ValueError names the workdir and what to provide.
  Damaged checkpoint steps are set aside and the newest intact one is used
  (checkpoint.load_latest). Prints which weights it loaded.
  The model computes in config.model.dtype (lvtp_jax.models.DTYPES).

  Returns:
    (model, params, prep, source): prep holds mean/std in 0..1 units the
    images are normalised with; source names the weights for results.json.
  """
  cfg = config.model
  dtype = cfg.get('dtype', 'float32')
  found = checkpoint.load_latest(workdir, config) if workdir else None
  if found is not None:
    model, params, prep, step = found
    source = f'{workdir}/checkpoints/{step}'
    print(f'weights: {source}', flush=True)
    return models.with_dtype(model, dtype), params, prep, source
  if not cfg.init_from:
    if not checkpoint.random_weights_requested(config):
      raise checkpoint.nothing_to_evaluate(
          workdir, 'a converted Segmenter (python -m lvtp_jax.convert '
          'segmenter --checkpoint checkpoint.pth --variant variant.yml --out '
          'DIR)')
    cfg = ml_collections.ConfigDict(dict(cfg.to_dict(), random_init=True))
  model, params, prep, initialised = model_init.build(cfg, config.seed,
                                                      strict_shape=False)
  if initialised:
    raise ValueError(
        f'{cfg.init_from} lacks parameters the configured model needs: '
        f'{initialised[:4]}{"..." if len(initialised) > 4 else ""}. '
        'Evaluating untrained heads is meaningless: train them first, or set '
        'config.model.aux_layers=() for the converted model as it is.')
  source = cfg.init_from or 'random_init'
  print(f'weights: {source}', flush=True)
  return model, params, prep, source


# Kept under its old name: callers script against it.
sweep_settings = sweeps.settings


def evaluate(config: ml_collections.ConfigDict,
             workdir: Optional[str] = None
             ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Evaluates every setting of config's sweep on the model config names.

  Returns:
    (rows, visuals): one results row per setting, and what the pictures are
    drawn from (see evaluate_sweep).
  """
  model, params, prep, source = build_model(config, workdir)
  return evaluate_sweep(config, model, params, prep, weights=source)


def evaluate_sweep(config: ml_collections.ConfigDict, model, params,
                   prep: Dict[str, Any], weights: str = ''
                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """`evaluate_model` for each setting of config.sweep (one model).

  Returns:
    (rows, visuals): the rows, and dict(prep=prep, maps={row name: exit
    maps}) with the first config.eval.exit_maps exit (and, for in-block
    reductions, merge) maps of every pruned setting
    (lvtp_jax.evaluation.plots.exit_maps draws them).
  """
  rows, maps = [], {}
  baseline = _Baseline(model)
  for setting in sweep_settings(config):
    row, row_maps = evaluate_model(setting, model, params, prep, baseline)
    if weights:
      row['weights'] = weights
    rows.append(row)
    if row_maps:
      maps[row['name']] = row_maps
  return rows, dict(prep=dict(prep), maps=maps)


class _Baseline(speedup.Unpruned):
  """The unpruned forward, compiled once per sweep: the reference of every
  pruned row's speed-up and realized-FLOP ratio (timed as the label map,
  as the pruned forward is), and its forward with aux for the token
  accuracies (seg_runner)."""

  def __init__(self, model):
    super().__init__(model, labels=True)
    self.forward = jax.jit(lambda p, x: model.apply({'params': p}, x,
                                                    return_aux=True))


def calibrate_capacities(config: ml_collections.ConfigDict, model, params,
                         prep: Dict[str, Any],
                         pcfg: ml_collections.ConfigDict
                         ) -> Tuple[Tuple[float, ...], Dict[str, Any]]:
  """Buffer capacities from the policy's masked-mode decisions.

  Runs the policy in masked mode on the first pcfg.calibrate.images images
  of pcfg.calibrate.split (at the evaluation resolution; per window in
  slide mode) and takes, per stage boundary, the pcfg.calibrate.quantile
  of the fraction of patches still active after it.

  Returns:
    (capacities, calibration): the fractions, and what the row records.
  """
  masked = ml_collections.ConfigDict(pcfg.to_dict())
  masked.mode = 'masked'
  oracle = pruning.attach(model, masked, normalization=prep)
  _, _, _, num, stats = seg_runner.run_split(
      config, oracle, params, prep, split=pcfg.calibrate.split,
      num_examples=pcfg.calibrate.images, desc='calibrate')
  tokens = stats.tokens()
  active = tokens[:, list(oracle.pruning.boundaries)] / tokens[:, :1]
  q = pcfg.calibrate.quantile
  fractions = np.quantile(active, q, axis=0, method='higher')
  n = int(tokens[0, 0])
  capacities = tuple(float(max(f, 1.0 / n)) for f in fractions)
  return capacities, dict(split=pcfg.calibrate.split, images=num,
                          forwards=len(tokens), quantile=q)


def attach_setting(config: ml_collections.ConfigDict, model, params,
                   prep: Dict[str, Any]):
  """The model with config.pruning attached, buffer capacities calibrated
  first when the setting asks for it (calibrate_capacities).

  Returns:
    (pruned model, the resolved config.pruning, the calibration record or
    None).
  """
  pcfg = pruning.resolve(config.pruning)
  calibration = None
  if (pcfg.name != 'none' and pcfg.mode == 'buffer' and pcfg.calibrate.images
      and pruning.kind(pcfg.name) != 'reduce'):   # in-block: static counts
    pcfg.capacities, calibration = calibrate_capacities(
        config, model, params, prep, pcfg)
  return pruning.attach(model, pcfg, normalization=prep), pcfg, calibration


def effective_gflops(model: seg_lib.Segmenter, stats: seg_runner.ForwardStats,
                     windows_per_image: float, spec: Any = None) -> float:
  """Analytic GFLOPs (2 x MACs) per image from the valid patch tokens of
  every block (and MLP) of every forward (stats), for the pruned forward of
  `spec` (None: unpruned): an in-block reduction decodes all N patches and
  runs the auxiliary heads only for dense='canvas'; exit and composed
  policies run every head and decode the patches that stayed."""
  in_block = spec is not None and pruning.kind(spec.label) == 'reduce'
  macs = float(np.mean(flops.segmenter_effective_macs(
      model, stats.tokens(), stats.mlp_tokens(), dense_decoder=in_block,
      aux_heads=not in_block or spec.dense == 'canvas')))
  return 2 * macs / 1e9 * windows_per_image


def evaluate_model(config: ml_collections.ConfigDict,
                   model: seg_lib.Segmenter, params: Any,
                   prep: Dict[str, Any], baseline: Optional[_Baseline] = None
                   ) -> Tuple[Dict[str, Any], List[Dict[str, np.ndarray]]]:
  """One results row: quality, FLOPs, tokens and throughput of one setting.

  Args:
    config: the setting (config.pruning, config.data, config.eval).
    model: the unpruned Segmenter; config.pruning is attached here.
    params: its parameters.
    prep: dict with 'mean' and 'std' in 0..1 units (see seg_runner).
    baseline: the sweep's unpruned forward (made here when None).

  Returns:
    (row, exit_maps): the row (DESIGN §3; the module docstring lists the
    fields) and the first config.eval.exit_maps exit maps.
  """
  baseline = baseline or _Baseline(model)
  pruned, pcfg, calibration = attach_setting(config, model, params, prep)
  spec = pruned.pruning
  result, images, windows_per_image, num, stats = seg_runner.run_split(
      config, pruned, params, prep, max_maps=config.eval.get('exit_maps', 0),
      baseline=(lambda x: baseline.forward(params, x)) if spec else None)

  batch = images.shape[0]
  forward_hw = tuple(images.shape[1:3])
  # Timed: the forward that returns labels (what evaluation needs), so
  # the shared full-resolution tail is not paid as logits.
  measured = speedup.measure(
      config.eval, jax.jit(lambda p, x: pruned.apply({'params': p}, x)),
      jax.jit(lambda p, x: pruned.apply({'params': p}, x, labels=True)),
      params, images, baseline if spec is not None else None)
  realized = measured['gflops_realized']
  tokens = stats.tokens()                                  # [F, depth]
  n = int(tokens[0, 0])
  p = model.num_prefix
  starts = [0] + ([layer for layer in spec.boundaries] if spec else [])
  mean_tokens = tokens.mean(axis=0)
  row = dict(
      name=config.eval.name or pcfg.name,
      policy=pcfg.name,
      params=pruning.summary(pcfg),
      dataset=f'{config.data.name}:{config.data.split}',
      num_images=num,
      inference=dict(mode=config.eval.mode, size=list(forward_hw),
                     windows_per_image=windows_per_image),
      miou=result['miou'],
      boundary_miou=result['boundary_miou'],
      pixel_accuracy=result['pixel_accuracy'],
      per_class_iou=[float(v) for v in result['per_class_iou']],
      gflops_realized=realized * windows_per_image,
      gflops_effective=effective_gflops(model, stats, windows_per_image,
                                        spec),
      images_per_second=measured['images_per_second'] / windows_per_image,
      batch_size=batch,
      dtype=jnp.dtype(model.dtype).name,
      device=speed.device_name(),
      stage_starts=starts,
      tokens_per_stage=[float(mean_tokens[s] + p) for s in starts],
  )
  if config.eval.get('family'):
    row['family'] = config.eval.family   # e.g. 'dtop (summaries)'
  if spec is None:
    return row, []
  row.update(speedup=measured['speedup'],
             realized_flop_ratio=measured['realized_ratio'])
  if stats.mlp_tokens() is not None:   # an in-block reduction ran
    row.update(tokens_per_block=[float(t + p) for t in mean_tokens],
               mlp_tokens_per_block=[float(t + p) for t in
                                     stats.mlp_tokens().mean(axis=0)])
  if pruning.kind(pcfg.name) == 'reduce':
    row.update(dense=spec.dense, forwards=len(tokens))
    return row, stats.maps               # merge maps
  overflow = stats.overflows()
  decisions = pruning.decision_flops(pruned, forward_hw, batch) / 1e9
  row.update(
      gflops_decisions=decisions * windows_per_image,
      decision_share=decisions / realized,
      capacity_per_stage=[n + p] + [
          (spec.capacity(s, n) if spec.mode == 'buffer' else n) + p
          for s in range(spec.num_stages)],
      # Patches leaving at each boundary, and reaching the decoder.
      exit_fraction_per_stage=[float(mean_tokens[a] - mean_tokens[b]) / n
                               for a, b in zip(starts, starts[1:])],
      decoder_fraction=float(mean_tokens[starts[-1]]) / n,
      overflow_tokens=int(overflow.sum()),
      overflow_forwards=int((overflow.sum(axis=1) > 0).sum()),
      forwards=len(tokens))
  if calibration:
    row['calibration'] = calibration
  if stats.token_accuracy():
    row['token_accuracy'] = stats.token_accuracy()
  return row, stats.maps


def config_defaults() -> ml_collections.ConfigDict:
  """config.eval fields segmentation evaluation reads (documented defaults)."""
  return ml_collections.ConfigDict(dict(
      name='',            # row name ('' = the policy name)
      family='',          # plot / selection group ('' = the policy name)
      mode='slide',       # 'whole' (fixed-size batches) or 'slide' (official)
      size=0,             # whole: pad every image to size x size
      short_size=512,     # resize the short side to this (0: keep the size)
      long_max=2048,      # ... with the long side at most this
      window=512,         # slide: window side
      stride=480,         # slide: window stride
      boundary_width=0,   # boundary band in px (0: 2% of the image diagonal)
      progress=True,      # progress bar on stderr
      exit_maps=0,        # exit maps kept per pruned setting (pictures)
      warmup=2,           # untimed calls before timing
      timing_iters=5,     # calls per timing round
      timing_rounds=3,    # rounds; the median is reported
      random_weights=False,  # score random weights when there is no
                             # checkpoint (smoke tests, speed); never implied
  ))

