"""config.pruning -> a static, hashable PruningSpec the Segmenter carries.

The spec is a module attribute (`Segmenter(..., pruning=spec)`, or
`attach(model, config.pruning)`), so a pruned model uses the parameters of
the unpruned one and every buffer size is a Python int at trace time.

config.pruning fields (defaults in `config_defaults`):
  name        registry name: 'none' (the unpruned model, no pruning code
              runs); exit policies for the Segmenter 'random', 'dtop',
              'lvtp'; in-block reductions for a ViT 'evit', 'tome'; see
              lvtp_jax.pruning.names().
  mode        'masked': every stage keeps all N patch slots and an exit only
              flips `valid` (exact reference semantics, no savings; the
              oracle). 'buffer': after stage boundary s the patch slots are
              gathered into a buffer of static capacity capacities[s]
              (real savings). In-block reductions: masked keeps N slots
              with the reduced tokens at the front and empty slots after,
              buffer runs every block on exactly its token count
              (lvtp_jax/pruning/inblock.py); the fields below are for
              exit policies.
  aux_source  where the per-token class logits at a stage boundary come
              from: 'aux_heads' (default): the model's auxiliary heads, and
              the stage boundaries are config.model.aux_layers;
              'final_head_on_intermediate': the final decoder (after the
              encoder's final LayerNorm) applied to the intermediate tokens,
              the only zero-training choice for a Segmenter without
              auxiliary heads (e.g. the official checkpoints); the
              boundaries are then config.pruning.layers, which must be set
              (LVTP spec §2; expect poor calibration at early layers).
  layers      aux_heads: the auxiliary layers (1-based blocks) at which the
              policy decides; () = all of config.model.aux_layers. Every
              auxiliary layer is a stage boundary either way: its head
              writes the exit canvas and, in buffer mode, the buffer is
              resized there. final_head_on_intermediate: the boundaries.
  capacities  buffer mode: patch slots after each stage boundary, as
              fractions of the N patches of the input (rounded up; the
              prefix slots come on top). One value per boundary, one
              value for all of them, or () = 1.0 (no shrinking).
              Non-increasing. Ignored in masked mode. Evaluation can
              measure them instead (config.pruning.calibrate).
  calibrate   buffer-mode capacities measured rather than given (used by
              lvtp_jax.evaluation.segmentation): images > 0 runs the policy
              in masked mode on that many images of `split` (at the
              evaluation resolution, per window in slide mode) and sets each
              capacity to the `quantile` of the fraction of patches still
              active after that boundary. quantile 1.0 = the largest seen;
              lower values trade overflow for speed.
  overflow    buffer mode, when more patches stay active than the next
              capacity holds: 'exit_confident' (default) force-exits the
              surplus patches the auxiliary head is most confident about
              (max softmax probability; ties: the later patch exits);
              'exit_last' force-exits the surplus that comes last in patch
              order. Either way the forced patches keep the canvas
              prediction of that boundary, so every patch still has a
              prediction, and they are counted in aux['overflow'].
  exit_summary  what the patches that exit leave behind for the ones that
              stay: 'none' (default; DToP's and LVTP's rule: they leave the
              attention) or 'per_class': at every boundary the exiting
              patches of each predicted class are merged (size-weighted
              mean) into one summary slot that stays in the buffer as an
              attention key and query, with ToMe's proportional attention
              (log size on its attention logits), and is never decoded.
              Training-free context for the remaining patches: a region that
              exits keeps one token's compute (lvtp_jax/pruning/engine.py).
  <policy>    each policy's own block, e.g. config.pruning.dtop.threshold.

Composed policies: name='<exit>+<reduction>' (e.g. 'lvtp+tome', 'dtop+evit')
runs an exit policy and an in-block reduction in one Segmenter forward,
each configured by its own block (config.pruning.lvtp, config.pruning.tome).
The reduction acts in the blocks before the first stage boundary, where
every slot is valid and its token counts are static (its token_counts for
a model of that depth: ToMe merges r tokens in each of those blocks; EViT's
layers must lie there); from the first boundary on the exit engine runs on
the reduced buffer (engine.py): a merged slot exits, with all the patches
it stands for, as one token. Buffer capacities stay fractions of the N
patches. A reduction that carries state from block to block (GTP's token
graph) cannot be composed.
"""

import dataclasses
import json
import math
from typing import Any, Dict, Hashable, Optional, Tuple

import ml_collections

from lvtp_jax.pruning import inblock
from lvtp_jax.pruning import registry

MODES = ('masked', 'buffer')
OVERFLOW_RULES = ('exit_confident', 'exit_last')
REASSEMBLE = ('logits', 'frozen', 'interpolate')
# How an in-block reduction on the Segmenter gives every original patch a
# token for the decoder (inblock.dense_source): 'source' (default), the
# token that represents the patch now (TokenState.src: the merged token for
# ToMe, the fused one for EViT's dropped patches, BAT's cluster token, GTP's
# receiving neighbour); a patch with no source (src -1: EViT without
# fusion, GTP's orphans with orphan_src 'none') takes the source of the
# nearest patch (grid distance, ties to the lower index) that has one.
# 'interpolate': the token of the nearest kept patch (one that is the only
# patch of its slot), so a region that was fused or merged is filled from
# its kept neighbours instead of from one summary token. 'canvas' (models
# with auxiliary heads; DToP's exit canvas): the auxiliary heads run on the
# buffer after their blocks; a patch that is not kept at the end takes the
# prediction of its slot at the last auxiliary layer at which it was still
# kept, and 'source' if it left before the first one.
DENSE = ('source', 'interpolate', 'canvas')
# What the Segmenter's decoder runs on after an in-block reduction:
# 'grid' (default), the N tokens of the dense rule (one per patch, copies of
# the slot tokens); 'reduced', the slots themselves, each with proportional
# attention for the number of patches the dense rule gives it (slots no
# patch takes are masked), and the slot logits then copied to the patches.
# A copy of a token m times and one token with log m on its attention
# logits attend and are attended to alike, so both decode the same logits
# (tested); 'reduced' is cheaper for the mask transformer.
DECODE = ('grid', 'reduced')
AUX_SOURCES = ('aux_heads', 'final_head_on_intermediate')
EXIT_SUMMARIES = ('none', 'per_class')
COMPOSE = '+'   # config.pruning.name='<exit>+<reduction>'


def parts(name: str) -> Tuple[str, str]:
  """config.pruning.name -> (policy, reduction): ('lvtp', 'tome') for the
  composed 'lvtp+tome', (name, '') for a single policy.

  Raises:
    ValueError: a composed name that is not an exit policy, '+', and an
      in-block reduction.
  """
  if COMPOSE not in name:
    return name, ''
  names = name.split(COMPOSE)
  kinds = [registry.get(n).kind for n in names]
  if kinds != ['exit', 'reduce'] or names[0] == 'none':
    exits = [n for n in registry.names()
             if registry.get(n).kind == 'exit' and n != 'none']
    reductions = [n for n in registry.names()
                  if registry.get(n).kind == 'reduce']
    raise ValueError(
        f'config.pruning.name={name!r}: a composed policy is one exit policy '
        f'{exits}, then {COMPOSE!r}, then one in-block reduction '
        f'{reductions}, e.g. \'lvtp+tome\'.')
  return names[0], names[1]


def kind(name: str) -> str:
  """'exit', 'reduce' or 'composed' (exit policy + in-block reduction)."""
  policy, reduction = parts(name)
  return 'composed' if reduction else registry.get(policy).kind


def config_defaults() -> ml_collections.ConfigDict:
  """config.pruning with every field and every registered policy's block."""
  cfg = ml_collections.ConfigDict()
  cfg.name = 'none'
  cfg.mode = 'masked'
  cfg.layers = ()
  cfg.aux_source = 'aux_heads'
  cfg.capacities = ()
  cfg.overflow = 'exit_confident'
  cfg.exit_summary = 'none'
  cfg.dense = 'source'         # DENSE: in-block reductions on the Segmenter
  cfg.decode = 'grid'          # DECODE: ... and what the decoder runs on
  cfg.calibrate = ml_collections.ConfigDict(dict(
      images=0, quantile=1.0, split='train'))
  for name in registry.names():
    block = registry.get(name).config_defaults()
    if block:
      cfg[name] = block
  return cfg


@dataclasses.dataclass(frozen=True)
class PruningSpec:
  """Static description of a pruned forward (hashable; see module docstring).

  Attributes:
    name: registered policy name.
    mode: 'masked' or 'buffer'.
    aux_source: 'aux_heads' or 'final_head_on_intermediate' (AUX_SOURCES).
    boundaries: the stage boundaries, sorted (1-based blocks).
    exit_layers: the boundaries at which the policy decides.
    capacities: per stage, the fraction of N patch slots kept after it.
    overflow: the overflow rule (OVERFLOW_RULES).
    reassemble: 'logits', 'frozen' or 'interpolate' (lvtp_jax/pruning/
      engine.py).
    params: the policy's validated, hashable parameters.
    exit_summary: 'none' or 'per_class' (EXIT_SUMMARIES).
    normalization: (mean, std) per RGB channel in 0..1 units that the input
      images were normalised with, for policies that read pixels
      (Policy.needs_normalization); None otherwise.
    dense: an in-block reduction on the Segmenter: how every patch gets a
      token for the decoder (DENSE).
    decode: ... and whether the decoder runs on the patch grid or on the
      reduced slots (DECODE).
    reduction: a composed policy's in-block reduction ('' for none): it
      runs in the blocks before the first boundary (module docstring).
    reduction_params: its validated parameters.
  """
  name: str
  mode: str
  aux_source: str
  boundaries: Tuple[int, ...]
  exit_layers: Tuple[int, ...]
  capacities: Tuple[float, ...]
  overflow: str
  reassemble: str
  params: Hashable = None
  exit_summary: str = 'none'
  normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
  dense: str = 'source'
  decode: str = 'grid'
  reduction: str = ''
  reduction_params: Hashable = None

  @property
  def label(self) -> str:
    """The config name: 'lvtp+tome' for a composed policy."""
    return self.name + (COMPOSE + self.reduction if self.reduction else '')

  @property
  def num_stages(self) -> int:
    return len(self.boundaries)

  def capacity(self, stage: int, num_patches: int) -> int:
    """Patch slots of the buffer after boundary `stage` (buffer mode)."""
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point.
    return max(1, math.ceil(round(self.capacities[stage] * num_patches, 6)))


def _merge(dst: ml_collections.ConfigDict, src: Any, path: str) -> None:
  for key in src.keys():
    value = src[key]
    if key not in dst:
      raise ValueError(f'{path}.{key} is not a pruning config field; known: '
                       f'{sorted(dst.keys())}.')
    if isinstance(dst[key], ml_collections.ConfigDict):
      _merge(dst[key], value, f'{path}.{key}')
      continue
    try:
      dst[key] = value
    except TypeError:
      raise ValueError(
          f'{path}.{key}={value!r} has the wrong type; expected a '
          f'{type(dst[key]).__name__} like the default {dst[key]!r}.'
      ) from None


def resolve(cfg: Optional[Any]) -> ml_collections.ConfigDict:
  """config.pruning completed with the defaults (a partial block is fine)."""
  out = config_defaults()
  if cfg is not None:
    _merge(out, cfg, 'config.pruning')
  return out


def per_stage(values: Tuple[Any, ...], num_stages: int, field: str,
              default: Any) -> Tuple[Any, ...]:
  """A per-stage tuple from () (default), one value, or one per stage."""
  values = tuple(values)
  if not values:
    return (default,) * num_stages
  if len(values) == 1:
    return values * num_stages
  if len(values) != num_stages:
    raise ValueError(
        f'{field} has {len(values)} entries; give one per stage boundary '
        f'({num_stages}), a single value for all of them, or ().')
  return values


def _normalization(value: Any) -> Optional[Tuple[Tuple[float, ...], ...]]:
  """dict(mean, std) or (mean, std) in 0..1 units -> hashable, or None."""
  if value is None:
    return None
  if isinstance(value, dict):
    value = (value['mean'], value['std'])
  mean, std = (tuple(float(v) for v in part) for part in value)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f'normalization={value!r}: expected RGB mean and std '
                     '(3 values each, std > 0) in 0..1 units, e.g. the '
                     "converted checkpoint's data config.")
  return mean, std


def build_spec(cfg: Optional[Any], model: Any,
               normalization: Any = None) -> Optional[PruningSpec]:
  """Validates config.pruning against `model`; None for 'none'.

  Args:
    cfg: config.pruning (partial blocks are completed with the defaults), or
      None for no pruning.
    model: the Segmenter the spec is for (reads aux_layers, depth).
    normalization: dict(mean, std) in 0..1 units the images are normalised
      with (the `prep` of a converted checkpoint or a training run); needed
      by policies that read pixels (LVTP's edge features).

  Returns:
    The PruningSpec, or None when the policy is 'none'.

  Raises:
    ValueError: naming the bad field and the fix.
  """
  cfg = resolve(cfg)
  name, reduction = parts(cfg.name)
  policy = registry.get(name)
  if cfg.mode not in MODES:
    raise ValueError(f'config.pruning.mode={cfg.mode!r} is not one of {MODES}.')
  if cfg.overflow not in OVERFLOW_RULES:
    raise ValueError(f'config.pruning.overflow={cfg.overflow!r} is not one of '
                     f'{OVERFLOW_RULES}.')
  if cfg.aux_source not in AUX_SOURCES:
    raise ValueError(f'config.pruning.aux_source={cfg.aux_source!r} is not '
                     f'one of {AUX_SOURCES}.')
  if not 0.0 < cfg.calibrate.quantile <= 1.0 or cfg.calibrate.images < 0:
    raise ValueError(
        f'config.pruning.calibrate: images={cfg.calibrate.images} must be >= '
        f'0 and quantile={cfg.calibrate.quantile} in (0, 1].')
  if cfg.name == 'none':
    return None
  if policy.kind == 'reduce':
    return _reduce_spec(cfg, policy, model)
  if not hasattr(model, 'aux_layers'):
    raise ValueError(
        f'config.pruning.name={cfg.name!r} exits tokens at auxiliary heads '
        f'and needs a Segmenter; got a {type(model).__name__}. In-block '
        f'reductions run on a ViT: '
        f'{[n for n in registry.names() if registry.get(n).kind == "reduce"]}.')
  aux_layers = tuple(sorted(set(model.aux_layers)))
  layers = tuple(sorted(set(cfg.layers)))
  if cfg.aux_source == 'aux_heads':
    if policy.needs_aux_heads and not aux_layers:
      raise ValueError(
          f'config.pruning.name={cfg.name!r} exits tokens at the auxiliary '
          'heads, but the model has no aux_layers; set config.model.'
          'aux_layers (e.g. (2, 4)) and train the heads first (phase 1), use '
          "config.pruning.aux_source='final_head_on_intermediate' with "
          "config.pruning.layers, or config.pruning.name='none'.")
    boundaries = aux_layers
    exit_layers = layers or aux_layers
    bad = sorted(set(exit_layers) - set(aux_layers))
    if bad:
      raise ValueError(
          f'config.pruning.layers={tuple(cfg.layers)} has {bad}, which are '
          f'not auxiliary layers of the model {aux_layers}; decisions need an '
          'auxiliary head there (leave layers=() for all of them).')
  else:
    bad = [k for k in layers if not 1 <= k < model.depth]
    if not layers or bad:
      raise ValueError(
          "config.pruning.aux_source='final_head_on_intermediate' needs "
          f'config.pruning.layers: the blocks (1 <= k < depth={model.depth}) '
          f'after which the final decoder scores the tokens; got '
          f'{tuple(cfg.layers)}.')
    boundaries = exit_layers = layers
  num_stages = len(boundaries)
  capacities = tuple(float(c) for c in per_stage(
      cfg.capacities, num_stages, 'config.pruning.capacities', 1.0))
  if any(not 0.0 < c <= 1.0 for c in capacities):
    raise ValueError(
        f'config.pruning.capacities={tuple(cfg.capacities)}: every capacity '
        'is a fraction of the N patch tokens in (0, 1] (e.g. (0.5, 0.25)).')
  if any(b > a for a, b in zip(capacities, capacities[1:])):
    raise ValueError(
        f'config.pruning.capacities={tuple(cfg.capacities)} must not increase '
        'from one stage to the next: exited patches never come back.')
  block = cfg.get(name, ml_collections.ConfigDict())
  reassemble = policy.reassemble(block)
  if reassemble not in REASSEMBLE:
    raise ValueError(f'config.pruning.{name}.reassemble={reassemble!r} is '
                     f'not one of {REASSEMBLE}.')
  if cfg.exit_summary not in EXIT_SUMMARIES:
    raise ValueError(f'config.pruning.exit_summary={cfg.exit_summary!r} is not '
                     f'one of {EXIT_SUMMARIES}.')
  normalization = _normalization(normalization)
  if policy.needs_normalization and normalization is None:
    raise ValueError(
        f'config.pruning.name={cfg.name!r} reads pixel values and needs the '
        'image normalisation: pass normalization=dict(mean=..., std=...) '
        '(0..1 units; the prep/data config of the checkpoint) to '
        'lvtp_jax.pruning.attach.')
  spec = PruningSpec(
      name=name, mode=cfg.mode, aux_source=cfg.aux_source,
      boundaries=boundaries, exit_layers=exit_layers, capacities=capacities,
      overflow=cfg.overflow, reassemble=reassemble,
      params=policy.make_params(block, num_stages),
      exit_summary=cfg.exit_summary,
      normalization=normalization if policy.needs_normalization else None)
  if reduction:
    spec = dataclasses.replace(
        spec, reduction=reduction,
        reduction_params=_composed_reduction(cfg, reduction, boundaries[0],
                                             model))
  return spec


def _composed_reduction(cfg: ml_collections.ConfigDict, reduction: str,
                        first_boundary: int, model: Any) -> Hashable:
  """The validated parameters of a composed policy's reduction, which acts
  in blocks 1 .. first_boundary - 1 (module docstring)."""
  policy = registry.get(reduction)
  base = registry.Policy
  if (type(policy).init_carry is not base.init_carry
      or type(policy).attention_transform is not base.attention_transform):
    raise ValueError(
        f'config.pruning.name={cfg.name!r}: {reduction!r} carries state from '
        'block to block (a token graph), which the exit engine does not keep '
        'across its boundaries; compose an exit policy with a reduction '
        'without one (e.g. tome, evit, bat).')
  if first_boundary < 2:
    raise ValueError(
        f'config.pruning.name={cfg.name!r}: the reduction acts in the blocks '
        f'before the first stage boundary, and that is block 1; move the '
        'first boundary later (config.model.aux_layers, or config.pruning.'
        'layers) or drop the reduction.')
  params = policy.make_params(cfg.get(reduction, ml_collections.ConfigDict()),
                              0)
  grid = model.img_size // model.patch_size
  try:
    inblock.validate_counts(policy, params, model.num_prefix + grid * grid,
                            model.num_prefix, first_boundary - 1)
  except ValueError as e:
    raise ValueError(
        f'config.pruning.name={cfg.name!r}: the reduction acts in blocks 1-'
        f'{first_boundary - 1}, before the first stage boundary (block '
        f'{first_boundary}), and there: {e}') from None
  return params


def _reduce_spec(cfg: ml_collections.ConfigDict, policy: Any,
                 model: Any) -> PruningSpec:
  """The spec of an in-block reduction (lvtp_jax/pruning/inblock.py)."""
  if cfg.dense not in DENSE:
    raise ValueError(
        f'config.pruning.dense={cfg.dense!r} is not one of {DENSE}.')
  if cfg.dense == 'canvas' and not getattr(model, 'aux_layers', ()):
    raise ValueError(
        "config.pruning.dense='canvas' writes the auxiliary heads' "
        'predictions, and the model has none (config.model.aux_layers); use '
        "'source' or 'interpolate'.")
  if cfg.decode not in DECODE:
    raise ValueError(f'config.pruning.decode={cfg.decode!r} is not one of '
                     f'{DECODE}.')
  params = policy.make_params(cfg.get(cfg.name, ml_collections.ConfigDict()),
                              0)
  grid = model.img_size // model.patch_size
  inblock.validate_counts(policy, params, model.num_prefix + grid * grid,
                          model.num_prefix, model.depth)
  return PruningSpec(
      name=cfg.name, mode=cfg.mode, aux_source=cfg.aux_source, boundaries=(),
      exit_layers=(), capacities=(), overflow=cfg.overflow,
      reassemble='logits', params=params, dense=cfg.dense,
      decode=cfg.decode)


def summary(cfg: Any) -> Dict[str, Any]:
  """What a results row records of config.pruning (JSON-friendly): the
  mode, the exit-engine fields for exit policies, and the policy's block
  (a composed policy's reduction block under the reduction's name)."""
  cfg = resolve(cfg)
  if cfg.name == 'none':
    return {}
  name, reduction = parts(cfg.name)
  out = dict(mode=cfg.mode)
  if registry.get(name).kind == 'exit':
    out.update(aux_source=cfg.aux_source, layers=list(cfg.layers),
               overflow=cfg.overflow, capacities=list(cfg.capacities))
  block = cfg.get(name, ml_collections.ConfigDict())
  out.update(json.loads(block.to_json_best_effort()))
  if reduction:
    out[reduction] = json.loads(cfg.get(
        reduction, ml_collections.ConfigDict()).to_json_best_effort())
  return out


def attach(model: Any, cfg: Optional[Any], normalization: Any = None) -> Any:
  """`model` running the policy of config.pruning (same parameters).

  Args:
    model: a Segmenter (exit policies) or a ViT classifier (in-block
      reductions, kind 'reduce').
    cfg: config.pruning, or None.
    normalization: dict(mean, std) in 0..1 units of the input images, for
      policies that read pixels (see build_spec).

  Returns:
    model.clone(pruning=spec); the unpruned model for 'none'.
  """
  spec = build_spec(cfg, model, normalization)
  if spec is None and not hasattr(model, 'pruning'):
    return model
  return model.clone(pruning=spec)
