"""The fixed-size token buffer that flows between encoder blocks (DESIGN §1).

XLA compiles static shapes, so a pruned token only saves work once it is out
of the buffer. Every function here keeps shapes a function of Python ints:
the buffer size K of the result is always an argument, never a traced value.

Vocabulary used across the codebase:
  slot      one row of the buffer, holding a prefix token (CLS, dist) or a
            (possibly merged) patch token.
  capacity  the static number of slots K of a buffer.
  src       for every original patch, the slot that represents it now, or -1
            when the patch has left the encoder (exited with a prediction).
"""

from typing import Any, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TokenState:
  """Tokens still being computed, plus the bookkeeping to reassemble patches.

  Attributes:
    x: [B, K, D] features; prefix tokens (CLS, dist) occupy the first slots.
    valid: [B, K] bool; False marks an empty slot (padding), masked as an
      attention key and ignored by every policy.
    size: [B, K] float32; how many original patches the slot stands for (1 at
      the start, merges add up; prefix slots count 1).
    src: [B, N] int32; slot index of every original patch, or -1.
    carry: state an in-block reduction keeps from block to block (a pytree,
      or None), indexed like the valid non-prefix slots in buffer order;
      GTP's graph (lvtp_jax/pruning/policies/gtp.py). Functions here pass
      it on unchanged; the in-block path moves slots only with `compact`,
      which keeps their order, so it stays aligned.
  """
  x: jax.Array
  valid: jax.Array
  size: jax.Array
  src: jax.Array
  carry: Any = None

  @property
  def capacity(self) -> int:
    return self.x.shape[1]

  @property
  def num_patches(self) -> int:
    return self.src.shape[1]


def init_state(x: jax.Array, num_prefix: int) -> TokenState:
  """Wraps freshly embedded tokens [B, num_prefix + N, D] in a TokenState."""
  b, k, _ = x.shape
  n = k - num_prefix
  src = jnp.broadcast_to(jnp.arange(num_prefix, k, dtype=jnp.int32), (b, n))
  return TokenState(
      x=x,
      valid=jnp.ones((b, k), bool),
      size=jnp.ones((b, k), jnp.float32),
      src=src)


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a: [B, K, ...], idx: [B, M] -> [B, M, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, idx, axis=1)


def remap_src(src: jax.Array, old_to_new: jax.Array) -> jax.Array:
  """Composes the patch->slot map with a slot->slot map.

  Args:
    src: [B, N] slot of each patch in the old buffer, or -1.
    old_to_new: [B, K_old] new slot of each old slot, or -1 when the old slot
      did not survive.

  Returns:
    [B, N] slot of each patch in the new buffer, or -1.
  """
  new = jnp.take_along_axis(old_to_new, jnp.maximum(src, 0), axis=1)
  return jnp.where(src >= 0, new, -1)


def gather(state: TokenState, idx: jax.Array,
           idx_valid: jax.Array = None) -> TokenState:
  """Builds a buffer of the slots `idx` of `state`, in the order given.

  Args:
    state: buffer of capacity K.
    idx: [B, M] int32 slot indices into `state`; M is the new capacity. An
      index may appear only once among the entries marked valid.
    idx_valid: optional [B, M] bool; False entries become empty slots and do
      not claim the patches of the slot they point at.

  Returns:
    A TokenState of capacity M. Patches whose slot is not gathered get
    src = -1 (they left the encoder); callers that keep them elsewhere (an exit
    canvas, a fused token) record that before gathering.
  """
  b, k = state.valid.shape
  m = idx.shape[1]
  idx = idx.astype(jnp.int32)
  if idx_valid is None:
    idx_valid = jnp.ones(idx.shape, bool)
  valid = take_rows(state.valid, idx) & idx_valid
  # Inverse map old slot -> new slot. Entries that are not valid are sent to
  # a dummy column K so they cannot overwrite a real one.
  target = jnp.where(valid, idx, k)
  new_pos = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
  old_to_new = jnp.full((b, k + 1), -1, jnp.int32)
  old_to_new = old_to_new.at[jnp.arange(b)[:, None], target].set(new_pos)
  return _moved(state, idx, valid, old_to_new[:, :k])


def _moved(state: TokenState, idx: jax.Array, valid: jax.Array,
           old_to_new: jax.Array) -> TokenState:
  """The buffer of slots `idx` [B, M] of `state`, given the new slots'
  validity [B, M] and the old -> new slot map [B, K] (-1: not moved)."""
  return TokenState(
      x=take_rows(state.x, idx),
      valid=valid,
      size=jnp.where(valid, take_rows(state.size, idx), 0.0),
      src=remap_src(state.src, old_to_new), carry=state.carry)


def scatter(values: jax.Array, idx: jax.Array, base: jax.Array) -> jax.Array:
  """Writes rows back where `gather` took them from (the inverse of gather).

  Args:
    values: [B, M, ...] rows of a gathered buffer.
    idx: [B, M] the slot indices that were used to gather.
    base: [B, K, ...] the array to write into (rows not in `idx` are kept).

  Returns:
    [B, K, ...] `base` with base[b, idx[b, m]] = values[b, m].
  """
  b = idx.shape[0]
  return base.at[jnp.arange(b)[:, None], idx].set(values)


def compact(state: TokenState, keep: jax.Array, capacity: int,
            num_prefix: int) -> Tuple[TokenState, jax.Array, jax.Array]:
  """Moves the kept slots, in their current order, into a smaller buffer.

  The prefix slots are always kept and stay first. When more slots are kept
  than fit, the ones that come last in buffer order do not make it; they are
  reported so the caller can apply its overflow rule (and count it).

  Args:
    state: buffer of capacity K.
    keep: [B, K] bool; slots to keep (empty slots are never kept).
    capacity: static new capacity M (num_prefix <= M <= K).
    num_prefix: number of prefix slots at the front of the buffer.

  Returns:
    (new_state, idx, overflow): `idx` [B, M] the old slot of every new slot
    (use it with `scatter`), `overflow` [B, K] bool, kept slots that did not
    fit.
  """
  b, k = keep.shape
  if not num_prefix <= capacity <= k:
    raise ValueError(
        f'capacity must lie in [num_prefix={num_prefix}, K={k}], got '
        f'{capacity}; set the stage capacity in config.pruning accordingly.')
  is_prefix = jnp.arange(k) < num_prefix
  keep = (keep | is_prefix[None]) & state.valid
  # Stable partition without a sort: a kept slot goes to its rank among the
  # kept ones, a dropped slot after all kept ones in its rank among the
  # dropped ones. `dest` is a permutation of 0..K-1 per image (the order a
  # stable argsort of "kept first" gives); new slot j takes the old slot whose
  # dest is j, found by a compare-and-reduce (argsort and scatter are slow on
  # CPU and cost a sort on TPU).
  n_keep = keep.sum(axis=1, keepdims=True, dtype=jnp.int32)
  rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1
  dest = jnp.where(keep, rank,
                   n_keep + jnp.cumsum(~keep, axis=1, dtype=jnp.int32) - 1)
  pos = jnp.arange(k, dtype=jnp.int32)
  hit = dest[:, None, :] == jnp.arange(capacity, dtype=jnp.int32)[None, :, None]
  idx = jnp.sum(jnp.where(hit, pos[None, None, :], 0), axis=2)    # [B, M]
  fits = keep & (rank < capacity)
  new_state = _moved(state, idx, jnp.arange(capacity)[None] < n_keep,
                     jnp.where(fits, rank, -1))
  overflow = keep & (rank >= capacity)
  return new_state, idx, overflow


def pad(state: TokenState, capacity: int) -> TokenState:
  """Appends empty slots (zero features, size 0, invalid) up to `capacity`.

  Masked-mode buffers of the in-block reductions keep their capacity this
  way: the empty slots are masked as attention keys, and their zero
  features keep every computation on them finite.
  """
  b, k, d = state.x.shape
  if capacity < k:
    raise ValueError(f'cannot pad a buffer of {k} slots to {capacity}.')
  extra = capacity - k
  return TokenState(
      x=jnp.concatenate([state.x, jnp.zeros((b, extra, d), state.x.dtype)],
                        axis=1),
      valid=jnp.concatenate([state.valid, jnp.zeros((b, extra), bool)],
                            axis=1),
      size=jnp.concatenate([state.size, jnp.zeros((b, extra),
                                                  state.size.dtype)], axis=1),
      src=state.src, carry=state.carry)


def new_slots(order: jax.Array, representative: jax.Array) -> jax.Array:
  """The old -> new slot map of a reduction that keeps or merges slots.

  Args:
    order: [B, M] the old slot each new slot is built on (its own features
      or the destination of a merge), each old slot at most once.
    representative: [B, K] for every old slot the old slot it ends up in:
      itself when kept or a merge destination, the destination when merged
      away, -1 when dropped.

  Returns:
    [B, K] new slot of every old slot, or -1 (remap_src composes it with
    src). A compare-and-reduce ([B, M, K]) instead of a scatter.
  """
  k = representative.shape[1]
  m = order.shape[1]
  hit = order[:, :, None] == jnp.arange(k, dtype=order.dtype)[None, None, :]
  slot_of = jnp.where(hit.any(axis=1),
                      jnp.sum(jnp.where(hit, jnp.arange(m)[None, :, None], 0),
                              axis=1), -1)                       # [B, K]
  new = jnp.take_along_axis(slot_of, jnp.maximum(representative, 0), axis=1)
  return jnp.where(representative >= 0, new, -1).astype(jnp.int32)


def patch_values(values: jax.Array, src: jax.Array,
                 fill: float = 0.0) -> jax.Array:
  """Reassembles per-slot values into per-patch values ("unmerge").

  Args:
    values: [B, K, ...] one row per slot.
    src: [B, N] slot of every patch, or -1.
    fill: value for patches with src = -1.

  Returns:
    [B, N, ...] the row of the slot that represents each patch.
  """
  out = take_rows(values, jnp.maximum(src, 0))
  mask = (src >= 0).reshape(src.shape + (1,) * (values.ndim - 2))
  return jnp.where(mask, out, fill)


def nearest_patch(has: jax.Array, grid: Tuple[int, int]) -> jax.Array:
  """[B, N] bool -> [B, N] int32: for every patch, the nearest patch with
  has=True (Euclidean distance on the (h, w) grid, ties to the lower patch
  index; a patch with has=True is its own nearest). Rows with no such patch
  give 0."""
  h, w = grid
  yx = np.stack(np.divmod(np.arange(h * w), w), axis=1).astype(np.float32)
  d2 = ((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1)        # [N, N]
  d2 = jnp.where(has[:, None, :], jnp.asarray(d2)[None], jnp.inf)
  return jnp.argmin(d2, axis=-1).astype(jnp.int32)
