"""Pruning policies by name, and what a policy sees at a stage boundary.

A policy is a stateless object registered under its config name
(`config.pruning.name`). It declares the signals it needs (`signals`), so the
model computes nothing unused, and decides with pure functions of arrays:
no Python control flow on traced values, ties broken by slot index (which is
original patch order, because buffers keep their tokens in that order).

Adding a policy is one new module in lvtp_jax/pruning/policies/ with a
`Policy` subclass and a `register(...)` call at its bottom, plus its import
in lvtp_jax/pruning/policies/__init__.py (docs/extending.md).

Signals a policy can declare (SIGNALS):
  'aux_logits'  [B, Kp, C] float32 logits of the auxiliary head at the
                boundary, one row per patch slot of the current buffer.
  'cls_attn'    [B, H, K] attention of the CLS query, of the block that ends
                at the boundary (all K slots, prefix included).
  'attn'        [B, H, K, K] full attention map of that block.
  'keys'        [B, H, K, hd] attention keys of that block.
  'image'       `Policy.prepare(images, params, ...)` is computed
                once per image (per window in sliding-window inference) from
                the padded, normalised input images [B, H, W, 3] and handed
                to every decision as `StageContext.prepared`: the place for
                per-patch low-level image features, or a per-image random
                key. `normalization` is PruningSpec.normalization, the
                (mean, std) to undo the normalisation with.
Every signal is under `lax.stop_gradient`: decisions never carry gradients.

Two kinds of policy (`Policy.kind`, DESIGN §1):

In-block reductions ('reduce': evit, tome, bat, gtp, random_drop) act inside an encoder block,
between its attention residual and its MLP, where their official code acts
(lvtp_jax/pruning/inblock.py). `reduce` receives a ReduceContext (the
buffer after the attention residual, all slots valid, prefix first, and the
declared attention signals of that block) and returns the smaller buffer;
how many tokens enter and leave every block is `token_counts`, a function
of the config and the token count alone, so buffers are exact in buffer
mode. Their signals are handed over as computed (not under stop_gradient):
each policy stops the gradient where its official code does.

Exit policies (random, dtop, lvtp) act at the stage boundaries, the blocks
after which the model has an auxiliary head (or, with
aux_source='final_head_on_intermediate', config.pruning.layers); `decide`
returns which active patch slots exit with their exit-canvas prediction, and
lvtp_jax/pruning/engine.py applies that to the TokenState (DESIGN §1's
`(state, signals, config) -> state`, split so that the buffer bookkeeping,
the canvas and the overflow rule are shared by every exit policy).
"""

from typing import (Any, Callable, Dict, FrozenSet, Hashable, List, Optional,
                    Tuple)

import flax
import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import ranking

SIGNALS = frozenset({'aux_logits', 'cls_attn', 'attn', 'keys', 'image'})
KINDS = ('exit', 'reduce')
# Signals that come from the attention of the block ending at a boundary.
ATTENTION_SIGNALS = frozenset({'cls_attn', 'attn', 'keys'})


@flax.struct.dataclass
class StageContext:
  """What a policy sees at one stage boundary (a pytree; stage, layer static).

  Attributes:
    stage: 0-based index of the boundary (PruningSpec.boundaries).
    layer: the (1-based) block after which the boundary sits.
    grid: (h, w) patch grid of the input; patch n is at (n // w, n % w).
    valid: [B, Kp] bool, the patch slots still active (Kp = patch slots of
      the current buffer: N in masked mode, the stage capacity in buffer mode).
    src: [B, N] int32, for every original patch its index among the Kp patch
      slots, or -1 when the patch has exited.
    signals: the declared signals (see the module docstring).
    prepared: `Policy.prepare` output when 'image' is declared, else None.
    merged: static; True when an in-block reduction ran before the boundary
      (a composed policy, spec.COMPOSED), so that a slot may stand for
      several patches (several entries of `src` name it).
  """
  stage: int = flax.struct.field(pytree_node=False)
  layer: int = flax.struct.field(pytree_node=False)
  grid: Tuple[int, int] = flax.struct.field(pytree_node=False)
  valid: jax.Array
  src: jax.Array
  signals: Dict[str, jax.Array]
  prepared: Any = None
  merged: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_patches(self) -> int:
    return self.src.shape[1]

  def patch_to_slot(self, values: jax.Array, fill=0) -> jax.Array:
    """[B, N, ...] per original patch -> [B, Kp, ...] per patch slot.

    Slots that hold no active patch get `fill`. Drawing per-patch values and
    moving them to slots makes a decision independent of the buffer layout,
    so masked and buffer mode decide alike. When a slot stands for several
    patches (`merged`, after an in-block reduction), it gets their mean
    (booleans: whether any of them is True); otherwise each slot has one
    patch and its value unchanged.
    """
    b, kp = self.valid.shape
    slot = jnp.where(self.src >= 0, self.src, kp)  # kp: dropped
    rows = jnp.arange(b)[:, None]
    if not self.merged:
      out = jnp.full((b, kp) + values.shape[2:], fill, values.dtype)
      return out.at[rows, slot].set(values, mode='drop')
    held = jnp.zeros((b, kp), jnp.int32).at[rows, slot].add(1, mode='drop')
    held = held.reshape(held.shape + (1,) * (values.ndim - 2))
    if values.dtype == jnp.bool_:
      hits = jnp.zeros(held.shape[:2] + values.shape[2:], jnp.int32).at[
          rows, slot].add(values.astype(jnp.int32), mode='drop')
      return jnp.where(held > 0, hits > 0, fill)
    total = jnp.zeros((b, kp) + values.shape[2:], jnp.float32).at[
        rows, slot].add(values.astype(jnp.float32), mode='drop')
    mean = (total / jnp.maximum(held, 1)).astype(values.dtype)
    return jnp.where(held > 0, mean, jnp.asarray(fill, values.dtype))


@flax.struct.dataclass
class ReduceContext:
  """What an in-block reduction sees (a pytree; layer, n_out static).

  Attributes:
    layer: the (1-based) block the reduction acts in.
    n_out: static number of slots of the buffer it returns (prefix
      included): token_counts()[layer].
    num_prefix: the prefix slots (CLS, dist) at the front, never reduced.
    state: the buffer after the block's attention residual, n_in slots,
      all valid, prefix first.
    signals: the declared attention signals of the block on those slots.
  """
  layer: int = flax.struct.field(pytree_node=False)
  n_out: int = flax.struct.field(pytree_node=False)
  num_prefix: int = flax.struct.field(pytree_node=False)
  state: Any
  signals: Dict[str, jax.Array]


class Policy:
  """Base class of a registered pruning policy.

  Subclasses set `name`, `kind` and `signals`, and override
  `config_defaults` and `make_params`; exit policies `decide` (and
  `prepare` when they declare 'image'), in-block reductions `token_counts`,
  `reduce` and `proportional`.
  """
  name: str = ''
  kind: str = 'exit'             # KINDS
  signals: FrozenSet[str] = frozenset()
  # Exit policies need the auxiliary heads: their boundaries are the aux layers.
  needs_aux_heads: bool = True
  # Reads pixel values in `prepare` (needs PruningSpec.normalization).
  needs_normalization: bool = False
  summary: str = ''                # one line for describe.py's listing
  field_help: Dict[str, str] = {}  # config field -> one-line meaning

  def config_defaults(self) -> ml_collections.ConfigDict:
    """The policy's own block, config.pruning.<name> (may be empty)."""
    return ml_collections.ConfigDict()

  def make_params(self, cfg: ml_collections.ConfigDict,
                  num_stages: int) -> Hashable:
    """Validated, hashable parameters from config.pruning.<name>.

    Raises a ValueError naming the bad field and the fix.
    """
    del cfg, num_stages
    return None

  def reassemble(self, cfg: ml_collections.ConfigDict) -> str:
    """How exited patches are reassembled (see engine.REASSEMBLE)."""
    return cfg.get('reassemble', 'logits')

  def prepare(self, images: jax.Array, params: Hashable, *,
              normalization: Optional[Tuple[Tuple[float, ...], ...]],
              patch_size: int) -> Any:
    """Per-image precomputation from the input images (signal 'image').

    images: [B, H, W, 3] as the encoder sees them (normalised, padded to a
    multiple of patch_size); normalization: PruningSpec.normalization.
    """
    del images, params, normalization, patch_size
    return None

  def decide(self, ctx: StageContext, params: Hashable) -> jax.Array:
    """[B, Kp] bool: the active patch slots that exit at this boundary."""
    raise NotImplementedError

  def token_counts(self, params: Hashable, num_tokens: int, num_prefix: int,
                   depth: int) -> Tuple[int, ...]:
    """In-block reductions: [depth + 1] slots entering each block (prefix
    included) and, last, leaving the final block; a ValueError names a
    setting the model cannot take (say, a layer beyond its depth)."""
    raise NotImplementedError

  def reduce(self, ctx: ReduceContext, params: Hashable) -> Any:
    """In-block reductions: the buffer of ctx.n_out slots (all valid) that
    the block's MLP runs on; sizes add up on merges and `src` maps every
    patch to the slot that represents it (-1: dropped)."""
    raise NotImplementedError

  def proportional(self, params: Hashable) -> bool:
    """In-block reductions: add log(size) to the attention logits of the
    blocks after the first reduction (ToMe's proportional attention)."""
    del params
    return False

  def init_carry(self, state: Any, params: Hashable,
                 grid: Tuple[int, int]) -> Any:
    """In-block reductions: the state carried from block to block
    (TokenState.carry), from the embedded tokens (all slots valid) and the
    patch grid (h, w); None when the policy keeps none."""
    del state, params, grid
    return None

  def attention_transform(self, params: Hashable, num_valid: int
                          ) -> Optional[Callable[[jax.Array, jax.Array],
                                                 jax.Array]]:
    """In-block reductions: a change to the post-softmax attention of
    every block, or None. Called per block with the (static) number of
    valid slots entering it; the callable maps (attn [B, H, K, K], valid
    [B, K]) to the attention that multiplies the values and that the
    policy's 'attn' signal reads (GTP's sparsity cut)."""
    del params, num_valid
    return None

  def size_weighted_pool(self, params: Hashable) -> bool:
    """In-block reductions: whether average pooling ('avg' models) weighs
    every token by its size (ToMe's rule) or takes the plain mean of the
    valid tokens (GTP's official pooling)."""
    del params
    return True


def ranks(keys: jax.Array) -> jax.Array:
  """[B, K] -> [B, K] int32: each slot's position in ascending key order.

  Stable: equal keys keep slot order, so ties go to the lower slot (the
  lower patch index). Policies rank with it to take "the n lowest". Keys
  must not be NaN (use +inf for "last"). Counts instead of sorting where
  that is cheaper (ranking.py).
  """
  return ranking.ranks(keys)


_REGISTRY: Dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
  """Adds a policy under `policy.name`; returns it."""
  if not policy.name:
    raise ValueError(f'{type(policy).__name__} has no name.')
  if policy.name in _REGISTRY:
    raise ValueError(f'a pruning policy named {policy.name!r} is already '
                     'registered.')
  if policy.kind not in KINDS:
    raise ValueError(f'policy {policy.name!r} has kind {policy.kind!r}; '
                     f'expected one of {KINDS}.')
  unknown = set(policy.signals) - SIGNALS
  if unknown:
    raise ValueError(f'policy {policy.name!r} declares unknown signals '
                     f'{sorted(unknown)}; known: {sorted(SIGNALS)}.')
  _REGISTRY[policy.name] = policy
  return policy


def names() -> List[str]:
  """Registered policy names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> Policy:
  """The policy registered as `name`; a ValueError lists the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'config.pruning.name={name!r} is not a known pruning '
                     f'policy; known: {names()}.')
  return _REGISTRY[name]
