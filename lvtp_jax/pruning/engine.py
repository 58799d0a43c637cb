"""The pruned Segmenter forward: stages, exit canvas, buffers, reassembly.

Stage boundaries are PruningSpec.boundaries (blocks k, 1-based, sorted): the
model's auxiliary layers, or config.pruning.layers with
aux_source='final_head_on_intermediate'; stage s is the s-th of them
(0-based). At each boundary:
  1. the boundary's head gives per-token logits on the current buffer: the
     auxiliary head of block k, or the final decoder after the encoder's
     final LayerNorm (a mask-transformer head restricts its attention to
     the valid slots);
  2. the exit canvas [B, N, C] takes that prediction for every patch still
     active; exited patches keep the one they left with;
  3. the policy (registry) decides which active patch slots exit; exited
     patches record the stage in `exit_stage`;
  4. masked mode: the exited slots become invalid (K stays N + prefix).
     Buffer mode: the remaining patch slots are gathered, in original patch
     order after the prefix slots (which always stay), into a buffer of the
     static capacity of the next stage (config.pruning.capacities). When more
     patches remain than fit, the overflow rule force-exits the surplus
     ('exit_confident': the most confident ones by the head's max softmax
     probability, ties: the later patch; 'exit_last': the last ones in patch
     order). Forced patches keep the canvas prediction of this boundary and
     exit at this stage like any other, and are counted in aux['overflow'],
     so overflow is never silent and every patch still has a prediction.
Exit summaries (config.pruning.exit_summary='per_class', ours): before the
exits leave, the exiting patch slots of each predicted class are merged into
one slot (the most confident of them; feature = size-weighted mean, size =
their total size) that stays in the buffer with no patch mapped to it. It is
a key and a query of every later block, with proportional attention (log
size added to its attention logits, so m identical tokens merged into one
attend and are attended to exactly as the m copies would be), it takes a
buffer slot (counted in tokens_per_block and the effective FLOPs), it never
exits and it is never decoded: heads and the decoder see patch slots only.
The exited patches still take their canvas prediction. Only the policy's
exits are summarised (patches forced out by the overflow rule are not). In
buffer mode the summaries stay first and the patches share the remaining
capacity; should the summaries alone exceed a capacity (many classes, a
tiny buffer), every patch exits there (counted as overflow) and the
summaries that come last in slot order are dropped: context is lost, never
a prediction.
All decisions are under `lax.stop_gradient`; the feature gathers and the
canvas writes are differentiable (so, as in the official DToP code, the loss
on an exited patch trains the head it exited at).

After the last block the final decoder (linear, or mask transformer with the
valid slots as its key mask) runs on the final buffer, and dense reassembly
gives every original patch a prediction: from the decoder through `src` when
the patch stayed, from the canvas when it exited. `reassemble` chooses what
the canvas holds (DToP spec §3 step 6, §7.2, adapted to softmax heads):
  'logits'  the exit head's logits; the final token map mixes logits (the
            official code's rule: it keeps mask logits on its canvas).
  'frozen'  the exit head's class probabilities (stored as log-probabilities);
            the final token map mixes probabilities: stayed patches get the
            decoder's log-softmax. Each patch's distribution is then exactly
            the one it had when it left. token_logits are log-probabilities,
            which softmax, argmax and cross-entropy treat as logits.
  'interpolate'  exited patches take the decoder logits of the nearest
            patch (Euclidean distance on the patch grid; ties: the lower
            patch index) that reached the decoder: pruned tokens are
            dropped and filled from their kept neighbours (LVTP spec §2,
            `pruned_fill`). When no patch of an image stayed, the canvas.
The token map is upsampled by the Segmenter exactly as the unpruned one.

A composed policy (spec.reduction, config.pruning.name='<exit>+<reduction>',
spec.py) first runs its in-block reduction in the blocks before the first
boundary, as inblock.forward does (static token counts; masked mode keeps
the N slots with the reduced tokens at the front). A slot may then stand
for several patches: `src` maps all of them to it, the head's prediction for
the slot goes to every one of them, they exit together, and policies that
read per-patch values see their mean per slot (StageContext.merged). Slots
are then in the reduction's order rather than patch order, so ties go to
the lower slot. Proportional attention, when the reduction asks for it,
holds in every block after its first reduction.

aux['aux_logits'][k] of a pruned model is the canvas right after head k
wrote it: head k's logits for the patches it saw and, for patches that had
already exited, their canvas entry (the prediction of the head they exited
at; log-probabilities with reassemble='frozen'). This is what the official
DToP code trains the later heads on.

Tie-breaking: buffers keep tokens in original patch order, so slot order is
patch order and every rank-based decision breaks ties by patch index, the
same in masked and buffer mode.

An all-patches-exit stage is safe: the CLS slot (and, in the mask decoder,
the class embeddings) is always a valid key, and padding slots hold copies of
real token features, so no softmax is fully masked and no row is degenerate.
"""

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from lvtp_jax.measure import flops
from lvtp_jax.pruning import inblock
from lvtp_jax.pruning import registry
from lvtp_jax.tokens import state as ts


def patch_slots(src: jax.Array, num_prefix: int) -> jax.Array:
  """[B, N] slot of each patch -> its index among the patch slots, or -1."""
  return jnp.where(src >= 0, src - num_prefix, -1)


def confidence(logits: jax.Array) -> jax.Array:
  """Max softmax probability in float32: [..., C] -> [...]."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).max(axis=-1)


def overflow_exits(remaining: jax.Array, conf: jax.Array, capacity: int,
                   rule: str) -> jax.Array:
  """The patch slots the overflow rule force-exits.

  Args:
    remaining: [B, Kp] bool, patch slots that would stay active.
    conf: [B, Kp] float32 confidence of the head at this boundary.
    capacity: number of patch slots of the next buffer left for patches:
      a static int, or [B, 1] int when exit summaries take some of them.
    rule: 'exit_confident' or 'exit_last' (see the module docstring).

  Returns:
    [B, Kp] bool, a subset of `remaining` with max(0, |remaining| - capacity)
    entries per image.
  """
  if rule == 'exit_last':
    rank = jnp.cumsum(remaining, axis=1) - 1
  else:
    # Staying order: least confident first; among equal confidences the
    # lower slot stays.
    rank = registry.ranks(jnp.where(remaining, conf, jnp.inf))
  return remaining & (rank >= capacity)


def canvas_entry(logits: jax.Array, reassemble: str) -> jax.Array:
  """What the canvas keeps for a patch given its head logits (float32)."""
  logits = logits.astype(jnp.float32)
  if reassemble == 'frozen':
    return jax.nn.log_softmax(logits, axis=-1)
  return logits


def exit_boundary(state: ts.TokenState, head_logits: jax.Array,
                  canvas: jax.Array, exit_stage: jax.Array, *, spec: Any,
                  stage: int, layer: int, num_prefix: int,
                  grid: Tuple[int, int], signals: Dict[str, jax.Array],
                  prepared: Any = None
                  ) -> Tuple[ts.TokenState, jax.Array, jax.Array, jax.Array,
                             jax.Array]:
  """Steps 2-4 of the module docstring at one stage boundary.

  Args:
    state: the buffer after the block ending at the boundary.
    head_logits: [B, Kp, C] auxiliary-head logits of its patch slots.
    canvas: [B, N, C] float32 exit canvas.
    exit_stage: [B, N] int32 stage each patch exited at (num_stages: not yet).
    spec: the PruningSpec.
    stage: 0-based boundary index.
    layer: the block (1-based) the boundary follows.
    num_prefix: prefix slots at the front of the buffer.
    grid: (h, w) patch grid of the input.
    signals: attention signals of the block ending here (policy's request).
    prepared: the policy's per-image precomputation, or None.

  Returns:
    (state, canvas, exit_stage, aux_logits [B, N, C], forced [B] int32): the
    next stage's buffer, the updated canvas and exit stages, head k's
    canvas-based logits (module docstring) and the overflow count.
  """
  p = num_prefix
  src = state.src
  active = src >= 0
  psrc = patch_slots(src, p)
  patch_valid = _patch_keys(state, p, spec)
  summaries = state.valid[:, p:] & ~patch_valid    # exit summaries so far
  kp = patch_valid.shape[1]
  seen = ts.patch_values(head_logits, psrc)
  aux_logits = jnp.where(active[..., None], seen, canvas)
  canvas = jnp.where(active[..., None], canvas_entry(seen, spec.reassemble),
                     canvas)

  decision_logits = jax.lax.stop_gradient(head_logits.astype(jnp.float32))
  exits = jnp.zeros_like(patch_valid)
  if layer in spec.exit_layers:
    policy = registry.get(spec.name)
    ctx = registry.StageContext(
        stage=stage, layer=layer, grid=tuple(grid), valid=patch_valid,
        src=psrc,
        signals=dict(jax.lax.stop_gradient(signals),
                     aux_logits=decision_logits),
        prepared=prepared, merged=bool(spec.reduction))
    exits = jax.lax.stop_gradient(policy.decide(ctx, spec.params))
    exits = exits & patch_valid
  remaining = patch_valid & ~exits
  if spec.exit_summary == 'per_class':
    state, carriers = summarize_exits(state, exits, decision_logits, p)
    summaries = summaries | carriers

  capacity = spec.capacity(stage, src.shape[1]) if spec.mode == 'buffer' else kp
  forced = jnp.zeros_like(exits)
  if capacity < kp:
    # Summary slots always stay; the patches share what is left.
    room = capacity - summaries.sum(axis=1, keepdims=True)
    forced = overflow_exits(remaining, confidence(decision_logits), room,
                            spec.overflow)
    remaining = remaining & ~forced
  left = ts.patch_values(exits | forced, psrc, fill=False)
  exit_stage = jnp.where(left, stage, exit_stage)
  state = state.replace(src=jnp.where(left, -1, state.src))
  stay = remaining | summaries
  if capacity < kp:
    keep = jnp.concatenate(
        [jnp.ones((remaining.shape[0], p), bool), stay], axis=1)
    state, _, _ = ts.compact(state, keep, p + capacity, p)
  else:
    state = state.replace(valid=state.valid.at[:, p:].set(stay))
  return (state, canvas, exit_stage, aux_logits,
          forced.sum(axis=1).astype(jnp.int32))


def owned_slots(src: jax.Array, capacity: int) -> jax.Array:
  """[B, N] patch -> slot map -> [B, K] bool: slots some patch maps to.

  A compare-and-reduce rather than a scatter (scatters are slow on CPU)."""
  slots = jnp.arange(capacity, dtype=src.dtype)
  return (src[:, :, None] == slots[None, None, :]).any(axis=1)


def summarize_exits(state: ts.TokenState, exits: jax.Array,
                    logits: jax.Array, num_prefix: int
                    ) -> Tuple[ts.TokenState, jax.Array]:
  """exit_summary='per_class': one summary slot per predicted class.

  The exiting patch slots of each class (argmax of the boundary head) are
  merged into the most confident of them (ties: the lower slot): its
  feature becomes their size-weighted mean and its size their total size.
  The caller then sends every exiting patch, that one's included, to the
  canvas, so the slot stays in the buffer without a patch (a summary).

  Args:
    state: the buffer at the boundary.
    exits: [B, Kp] bool, patch slots that exit.
    logits: [B, Kp, C] float32 head logits of the patch slots.
    num_prefix: prefix slots at the front of the buffer.

  Returns:
    (state, carriers [B, Kp] bool): the buffer with the merged features and
    sizes, and the slots that now hold a summary.
  """
  p = num_prefix
  _, kp, c = logits.shape
  x, size = state.x[:, p:], state.size[:, p:]
  cls = jnp.argmax(logits, axis=-1)                          # [B, Kp]
  conf = confidence(logits)
  # One-hot class membership of the exiting slots (matmuls, no scatter).
  member = jax.nn.one_hot(cls, c, dtype=jnp.float32) * exits[..., None]
  w = member * size[..., None]                               # [B, Kp, C]
  total = w.sum(axis=1)                                      # [B, C]
  summed = jnp.einsum('bkc,bkd->bcd', w, x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  mean = summed / jnp.maximum(total, 1e-9)[..., None]        # [B, C, D]
  # Carrier of a class: its most confident exiting slot, the lower on ties.
  score = jnp.where(member > 0, conf[..., None], -1.0)       # [B, Kp, C]
  best = jnp.argmax(score, axis=1)                           # [B, C]
  present = total > 0
  carriers = ((jnp.arange(kp)[None, :, None] == best[:, None, :])
              & present[:, None, :]).any(axis=-1)            # [B, Kp]
  take = lambda a: jnp.take_along_axis(a, cls.reshape(cls.shape + (1,) * (
      a.ndim - 2)), axis=1)
  new_x = jnp.where(carriers[..., None], take(mean).astype(x.dtype), x)
  new_size = jnp.where(carriers, take(total), size)
  return state.replace(x=state.x.at[:, p:].set(new_x),
                       size=state.size.at[:, p:].set(new_size)), carriers


def reassemble(decoder_logits: jax.Array, src: jax.Array, canvas: jax.Array,
               num_prefix: int, how: str,
               grid: Tuple[int, int]) -> jax.Array:
  """Dense [B, N, C] token logits from the final buffer and the canvas.

  Args:
    decoder_logits: [B, Kp, C] final-decoder logits of the patch slots.
    src: [B, N] slot of every patch (-1: exited).
    canvas: [B, N, C] float32 exit canvas.
    num_prefix: prefix slots at the front of the buffer.
    how: 'logits', 'frozen' or 'interpolate' (module docstring).
    grid: (h, w) patch grid, h * w = N.
  """
  stayed = src >= 0
  dec = ts.patch_values(decoder_logits, patch_slots(src, num_prefix))
  if how == 'interpolate':
    near = ts.nearest_patch(stayed, grid)
    filled = jnp.take_along_axis(dec, near[..., None], axis=1)
    any_stayed = stayed.any(axis=1)[:, None, None]
    fill = jnp.where(any_stayed, filled.astype(jnp.float32), canvas)
    return jnp.where(stayed[..., None], dec.astype(jnp.float32), fill)
  return jnp.where(stayed[..., None], canvas_entry(dec, how), canvas)


def _patch_keys(state: ts.TokenState, p: int, spec: Any) -> jax.Array:
  """[B, Kp] bool: valid slots that hold a patch (heads, policies and the
  decoder never see exit summaries). Without summaries every valid slot
  holds one, and nothing is computed."""
  valid = state.valid[:, p:]
  if spec.exit_summary == 'none':
    return valid
  return valid & owned_slots(state.src, state.valid.shape[1])[:, p:]


def boundary_logits(model: Any, spec: Any, layer: int, state: ts.TokenState,
                    masked: bool, train: bool) -> jax.Array:
  """[B, Kp, C] per-token logits of the head at boundary `layer`."""
  p = model.num_prefix
  valid = _patch_keys(state, p, spec) if masked else None
  if spec.aux_source == 'aux_heads':
    return model.aux_heads[layer](state.x[:, p:], train, valid=valid)
  tokens = model.encoder.norm(state.x)[:, p:]
  return model.decode_head(tokens, train, valid=valid)


def forward(model: Any, images: jax.Array, train: bool
            ) -> Tuple[jax.Array, Tuple[int, int], Dict[str, Any]]:
  """The pruned encoder + decoder of a bound Segmenter.

  Args:
    model: the Segmenter (inside apply), with `model.pruning` set.
    images: [B, H, W, 3] padded to a multiple of the patch.
    train: training mode (drop-path).

  Returns:
    (token_logits [B, N, C], grid, aux) with aux holding 'aux_logits',
    'valid_tokens', 'tokens_per_block', 'exit_stage', 'overflow' (see
    Segmenter.__call__).
  """
  spec = model.pruning
  aux_layers = tuple(sorted(set(model.aux_layers)))
  if spec.aux_source == 'aux_heads' and spec.boundaries != aux_layers:
    raise ValueError(
        f'the pruning spec was built for aux_layers {spec.boundaries} but the '
        f'model has {aux_layers}; rebuild it with '
        'lvtp_jax.pruning.attach(model, config.pruning).')
  policy = registry.get(spec.name)
  p = model.num_prefix
  state, grid = model.encoder.embed(images)
  b, n = state.src.shape
  prepared = None
  if 'image' in policy.signals:
    prepared = jax.lax.stop_gradient(
        policy.prepare(images, spec.params, normalization=spec.normalization,
                       patch_size=model.patch_size))
  canvas = jnp.zeros((b, n, model.num_classes), jnp.float32)
  exit_stage = jnp.full((b, n), spec.num_stages, jnp.int32)
  stage_of = {layer: s for s, layer in enumerate(spec.boundaries)}
  aux_logits, overflow, tokens, slots, mlp = {}, [], [], [], []
  reduce_at = _composed_reductions(spec, state.capacity, p)
  proportional = bool(reduce_at) and registry.get(
      spec.reduction).proportional(spec.reduction_params)
  masked = False  # every slot is valid until the first reduction or boundary
  reduced = False
  for i in range(model.depth):
    layer = i + 1
    tokens.append(state.valid[:, p:].sum(axis=1).astype(jnp.int32))
    slots.append(state.valid.sum(axis=1))
    want = frozenset()
    if layer in spec.exit_layers:
      want = policy.signals & registry.ATTENTION_SIGNALS
    reduce = reduce_at.get(layer)
    if reduce is not None:
      want = want | (registry.get(spec.reduction).signals
                     & registry.ATTENTION_SIGNALS)
      if spec.mode == 'masked':
        reduce = functools.partial(reduce, capacity=state.capacity)
    state, signals = model.encoder.run_block(
        i, state, masked=masked, want=want, train=train, reduce=reduce,
        proportional=(proportional and reduced) or (
            masked and spec.exit_summary != 'none'))
    mlp.append(state.valid[:, p:].sum(axis=1).astype(jnp.int32))
    if reduce is not None:
      reduced = True
      masked = masked or spec.mode == 'masked'
    if layer not in stage_of:
      continue
    head_logits = boundary_logits(model, spec, layer, state, masked, train)
    state, canvas, exit_stage, aux_logits[layer], forced = exit_boundary(
        state, head_logits, canvas, exit_stage, spec=spec,
        stage=stage_of[layer], layer=layer, num_prefix=p, grid=grid,
        signals=signals, prepared=prepared)
    overflow.append(forced)
    masked = True
  x = model.encoder.norm(state.x)[:, p:]
  decoder_logits = model.decode_head(x, train,
                                     valid=_patch_keys(state, p, spec))
  token_logits = reassemble(decoder_logits, state.src, canvas, p,
                            spec.reassemble, grid)
  aux = dict(aux_logits=aux_logits, valid_tokens=jnp.stack(slots, axis=1),
             tokens_per_block=jnp.stack(tokens, axis=1),
             exit_stage=exit_stage, overflow=jnp.stack(overflow, axis=1))
  if reduce_at:
    aux['mlp_tokens_per_block'] = jnp.stack(mlp, axis=1)
    aux['state'] = state
  return token_logits, grid, aux


def _composed_reductions(spec: Any, num_tokens: int,
                         num_prefix: int) -> Dict[int, Any]:
  """A composed policy's reduction: {block (1-based): the Block `reduce`
  hook} for the blocks before the first boundary whose token count drops
  (buffer mode: to exactly the new count; masked mode: the caller adds the
  buffer's capacity). Empty without a reduction."""
  if not spec.reduction:
    return {}
  policy = registry.get(spec.reduction)
  counts = inblock.validate_counts(policy, spec.reduction_params, num_tokens,
                                   num_prefix, spec.boundaries[0] - 1)
  return {i + 1: functools.partial(
      inblock.reduce_block, policy=policy, params=spec.reduction_params,
      layer=i + 1, n_in=n_in, n_out=n_out, capacity=n_out,
      num_prefix=num_prefix)
          for i, (n_in, n_out) in enumerate(zip(counts, counts[1:]))
          if n_out != n_in}


def decision_flops(model: Any, image_hw: Tuple[int, int],
                   batch_size: int = 1) -> float:
  """XLA-counted FLOPs per image of the policy's own work in one forward.

  That is `prepare` (once) plus `decide` at every exit boundary, on the
  buffer sizes the forward has there (N patch slots in masked mode, the
  previous stage's capacity in buffer mode): the scoring and clustering,
  without the engine's bookkeeping (canvas writes, gathers) and without the
  heads, which the analytic count already has. Lowered on abstract inputs,
  so nothing runs.

  Args:
    model: a Segmenter with a pruning spec attached.
    image_hw: (H, W) of one forward's input.
    batch_size: the batch the count is divided by.
  """
  spec = model.pruning
  policy = registry.get(spec.name)
  p = model.patch_size
  grid = (-(-image_hw[0] // p), -(-image_hw[1] // p))
  n = grid[0] * grid[1]
  b = batch_size
  heads = model.num_heads
  hd = model.width // heads
  slots = []
  kp = n
  for s in range(spec.num_stages):
    slots.append(kp)
    if spec.mode == 'buffer':
      kp = spec.capacity(s, n)
  shape = jax.ShapeDtypeStruct
  padded = (b, grid[0] * p, grid[1] * p, 3)

  def stage_inputs(kp):
    k = kp + model.num_prefix
    signals = dict(aux_logits=shape((b, kp, model.num_classes), jnp.float32),
                   cls_attn=shape((b, heads, k), jnp.float32),
                   attn=shape((b, heads, k, k), jnp.float32),
                   keys=shape((b, heads, k, hd), jnp.float32))
    wanted = (policy.signals & registry.ATTENTION_SIGNALS) | {'aux_logits'}
    return (shape((b, kp), jnp.bool_), shape((b, n), jnp.int32),
            {name: signals[name] for name in wanted})

  def work(images, stages):
    prepared = None
    if 'image' in policy.signals:
      prepared = policy.prepare(images, spec.params,
                                normalization=spec.normalization,
                                patch_size=p)
    out = []
    for s, layer in enumerate(spec.boundaries):
      if layer in spec.exit_layers:
        valid, src, signals = stages[s]
        ctx = registry.StageContext(stage=s, layer=layer, grid=grid,
                                    valid=valid, src=src, signals=signals,
                                    prepared=prepared)
        out.append(policy.decide(ctx, spec.params))
    return out

  stages = [stage_inputs(kp) for kp in slots]
  return flops.lowered_flops(
      jax.jit(work).lower(shape(padded, jnp.float32), stages)) / b
