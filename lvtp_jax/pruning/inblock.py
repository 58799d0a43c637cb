"""In-block token reduction: the ViT forward with EViT, ToMe and their kin.

An in-block reduction (registry.Policy with kind 'reduce') acts inside an
encoder block, between the attention residual and the MLP, as the official
EViT, ToMe and GTP code does: the block's attention runs on all n_in tokens
and its MLP on the n_out the policy returns (DESIGN §1). How many tokens
enter and leave every block is `policy.token_counts(params, N, prefix,
depth)`, a function of the config and the token count alone, so:

  buffer  every block runs on a buffer of exactly its token count: the
          savings are real and no slot is ever empty;
  masked  the buffer keeps its N slots: the policy's output (n_out tokens,
          in its order) fills the front and the rest are empty slots,
          masked as attention keys. The oracle: same math, no savings; the
          tests check masked == buffer.

The policy always sees a buffer of n_in valid slots, prefix first, in the
order the previous reduction left them (the even/odd split of ToMe and the
score order of EViT depend on it): in masked mode the valid slots are first
moved to the front (`ts.compact`, which keeps their order), with the
attention signals gathered alike.

Proportional attention (log size added to the attention logits) is the
policy's choice (`policy.proportional`); like the official ToMe, it starts
in the block after the first reduction (sizes are all 1 before).

A policy may also keep state from block to block (`policy.init_carry`,
built once from the embedded tokens; it rides in TokenState.carry, indexed
like the valid non-prefix slots, which the masked path keeps in order) and
change every block's post-softmax attention (`policy.attention_transform`,
given the block's static count of valid slots): GTP carries its token graph
and cuts small attention entries this way.
"""

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from lvtp_jax.pruning import registry
from lvtp_jax.tokens import state as ts


def _take_slots(signal: jax.Array, name: str, idx: jax.Array) -> jax.Array:
  """A block's attention signal restricted to the slots `idx` [B, M]."""
  take = lambda a, axis: jnp.take_along_axis(
      a, jnp.expand_dims(idx, tuple(range(1, axis)) +
                         tuple(range(axis + 1, a.ndim))), axis=axis)
  if name == 'cls_attn':    # [B, H, K]
    return take(signal, 2)
  if name == 'keys':        # [B, H, K, hd]
    return take(signal, 2)
  if name == 'attn':        # [B, H, K, K]
    return take(take(signal, 2), 3)
  raise ValueError(f'no slot axis known for signal {name!r}.')


def reduce_block(state: ts.TokenState, signals: Dict[str, jax.Array], *,
                 policy: registry.Policy, params: Any, layer: int, n_in: int,
                 n_out: int, capacity: int, num_prefix: int) -> ts.TokenState:
  """One in-block reduction (Block's `reduce` hook).

  Args:
    state: the buffer after the attention residual (n_in valid slots; in
      masked mode inside a larger buffer).
    signals: the block's attention signals the policy declared.
    policy, params: the registered policy and its validated parameters.
    layer: the 1-based block.
    n_in, n_out: static token counts entering and leaving the block.
    capacity: slots of the returned buffer (n_out in buffer mode, the
      input's capacity in masked mode).
    num_prefix: prefix slots at the front.

  Returns:
    The reduced buffer, padded with empty slots up to `capacity`.
  """
  if state.capacity != n_in:
    state, idx, _ = ts.compact(state, state.valid, n_in, num_prefix)
    signals = {k: _take_slots(v, k, idx) for k, v in signals.items()}
  out = policy.reduce(registry.ReduceContext(
      layer=layer, n_out=n_out, num_prefix=num_prefix, state=state,
      signals=signals), params)
  if out.capacity != n_out:
    raise ValueError(f'policy {policy.name!r} returned {out.capacity} slots '
                     f'at block {layer}; its token_counts say {n_out}.')
  return ts.pad(out, capacity) if capacity > n_out else out


def forward(model: Any, spec: Any, images: jax.Array, train: bool,
            taps: Tuple[int, ...] = ()
            ) -> Tuple[ts.TokenState, Dict[str, Any]]:
  """A ViT encoder with an in-block reduction.

  Args:
    model: the ViT (inside apply): a classifier, or a Segmenter's encoder.
    spec: the PruningSpec of the reduction (the classifier's own
      model.pruning, or the Segmenter's).
    images: [B, H, W, 3].
    train: training mode (drop-path).
    taps: blocks (1-based) whose output buffer to return as well.

  Returns:
    (state, aux): the final buffer (before the final LayerNorm), and
    'valid_tokens' / 'mlp_tokens' [B, depth] int32 valid slots entering
    each block and its MLP, 'state' the final TokenState, 'taps' {block:
    the TokenState after it}.
  """
  policy = registry.get(spec.name)
  state, grid = model.embed(images)
  with jax.named_scope('policy_init'):   # bench/profile.py counts it
    state = state.replace(carry=policy.init_carry(state, spec.params, grid))
  p = model.num_prefix
  counts = policy.token_counts(spec.params, state.capacity, p, model.depth)
  masked = spec.mode == 'masked'
  proportional = policy.proportional(spec.params)
  want = policy.signals & registry.ATTENTION_SIGNALS
  valid, mlp, tapped = [], [], {}
  reduced = False
  for i in range(model.depth):
    n_in, n_out = counts[i], counts[i + 1]
    valid.append(state.valid.sum(axis=1, dtype=jnp.int32))
    reduce = None
    if n_out != n_in:
      reduce = functools.partial(
          reduce_block, policy=policy, params=spec.params, layer=i + 1,
          n_in=n_in, n_out=n_out,
          capacity=state.capacity if masked else n_out, num_prefix=p)
    state, _ = model.run_block(
        i, state, masked=masked and reduced,
        proportional=proportional and reduced,
        want=want if reduce else frozenset(), train=train, reduce=reduce,
        attn_transform=policy.attention_transform(spec.params, n_in))
    mlp.append(state.valid.sum(axis=1, dtype=jnp.int32))
    reduced = reduced or reduce is not None
    if i + 1 in taps:
      tapped[i + 1] = state
  return state, dict(valid_tokens=jnp.stack(valid, axis=1),
                     mlp_tokens=jnp.stack(mlp, axis=1), state=state,
                     taps=tapped)


def dense_source(src: jax.Array, grid: Tuple[int, int], num_slots: int,
                 rule: str = 'source') -> jax.Array:
  """The slot whose token every original patch decodes from after an
  in-block reduction: the Segmenter's dense reassembly (spec.DENSE).

  Args:
    src: [B, N] the slot that represents each patch (TokenState.src), -1
      for a patch no slot represents.
    grid: the (h, w) patch grid, h w = N.
    num_slots: K, the slots of the final buffer (prefix included).
    rule: 'source': src; a patch with src -1 takes the source of the
      nearest patch that has one. 'interpolate': a patch that is the only
      one its slot stands for (a kept patch) takes its own slot; every
      other patch (merged, fused, clustered, propagated, dropped) the slot
      of the nearest kept patch; an image with no kept patch falls back to
      'source'. Nearest: Euclidean grid distance, ties to the lower patch
      index.

    ('canvas' decodes like 'source'; the Segmenter then overwrites the
    patches that left with their canvas entry: kept_patches.)

  Returns:
    [B, N] int32 slot indices in [0, K).
  """
  has = src >= 0
  src = jnp.where(has, src, jnp.take_along_axis(
      src, ts.nearest_patch(has, grid), axis=1))
  if rule == 'interpolate':
    kept = kept_patches(jnp.where(has, src, -1), num_slots)
    near = jnp.take_along_axis(src, ts.nearest_patch(kept, grid), axis=1)
    src = jnp.where(kept.any(axis=1, keepdims=True), near, src)
  return jnp.maximum(src, 0).astype(jnp.int32)


def kept_patches(src: jax.Array, num_slots: int) -> jax.Array:
  """[B, N] slot of each patch (-1: none) -> [B, N] bool: the patches alone
  in their slot (not merged, fused, clustered or dropped)."""
  held = patches_per_slot(src, num_slots)
  return (src >= 0) & (jnp.take_along_axis(held, jnp.maximum(src, 0), axis=1)
                       == 1)


def patches_per_slot(src: jax.Array, num_slots: int) -> jax.Array:
  """[B, N] slot of each patch (-1: none) -> [B, K] int32 patches per slot
  (a compare-and-sum: scatters are slow on CPU)."""
  slots = jnp.arange(num_slots, dtype=src.dtype)
  return (src[:, :, None] == slots).sum(axis=1, dtype=jnp.int32)


def is_reduction(spec: Any) -> bool:
  """Whether the policy of `spec` is an in-block reduction."""
  return registry.get(spec.name).kind == 'reduce'


def size_weighted_pool(spec: Any) -> bool:
  """Whether the policy of `spec` weighs average pooling by token size."""
  return registry.get(spec.name).size_weighted_pool(spec.params)


def validate_counts(policy: registry.Policy, params: Any, num_tokens: int,
                    num_prefix: int, depth: int) -> Tuple[int, ...]:
  """policy.token_counts, checked: depth + 1 non-increasing counts that
  keep the prefix; a ValueError names the policy otherwise."""
  counts = tuple(int(c) for c in policy.token_counts(params, num_tokens,
                                                     num_prefix, depth))
  if (len(counts) != depth + 1 or counts[0] != num_tokens
      or any(b > a for a, b in zip(counts, counts[1:]))
      or counts[-1] < num_prefix):
    raise ValueError(
        f'policy {policy.name!r} gave token counts {counts} for {num_tokens} '
        f'tokens and {depth} blocks; expected {depth + 1} non-increasing '
        f'counts from {num_tokens} down to at least {num_prefix}.')
  return counts
