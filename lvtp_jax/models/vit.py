"""ViT / DeiT in flax.linen, numerically equal to timm's VisionTransformer.

The encoder blocks run on a `TokenState` (lvtp_jax.tokens), so pruning
policies can shrink the buffer between blocks without touching the model.
Parameter names follow timm's module names (`blocks_3/attn/qkv/kernel` is
timm's `blocks.3.attn.qkv.weight`, transposed), which keeps the converter a
rename plus transposes.

Numerics that matter for parity with timm (../shared/specs/weights_and_data.md
§1.3): exact (erf) GELU, LayerNorm eps 1e-6 with two-pass variance, q scaled
by head_dim**-0.5 before q @ k^T, class (and dist) token with their own rows
of `pos_embed`, logits from the CLS token, distilled models averaging both
heads.
"""

from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvtp_jax.models import posemb as posemb_lib
from lvtp_jax.pruning import inblock as pruning_inblock
from lvtp_jax.tokens import state as ts

# name -> (width, depth, num_heads, mlp_dim)
VARIANTS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
}
PATCH_SIZES = (8, 16, 32)

POOLS = ('token', 'avg')

# Signals an attention layer can hand to a pruning policy. Each is computed
# only when asked for (a static set), so unused ones cost nothing.
SIGNALS = frozenset({
    'cls_attn',  # [B, H, K] attention of the CLS query over all slots
    'attn',      # [B, H, K, K] full attention map
    'keys',      # [B, H, K, hd] attention keys
})

_NEG = -1e30  # masked logit: exp underflows to exactly 0 in float32


def variant_fields(variant: str) -> Dict[str, int]:
  """'S/16' -> dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16)."""
  try:
    name, patch = variant.split('/')
    width, depth, heads, mlp = VARIANTS[name]
    patch = int(patch)
  except (ValueError, KeyError):
    raise ValueError(
        f'unknown ViT variant {variant!r}; expected "<size>/<patch>" with size '
        f'in {sorted(VARIANTS)} and patch in {PATCH_SIZES}, e.g. "S/16".'
    ) from None
  if patch not in PATCH_SIZES:
    raise ValueError(f'patch size {patch} in variant {variant!r} is not one of '
                     f'{PATCH_SIZES}.')
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
              patch_size=patch)


def check_images(images: jax.Array, patch_size: Optional[int]) -> None:
  """Raises a ValueError naming the problem when images are not usable."""
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, 3] (NHWC), got shape '
                     f'{tuple(images.shape)}.')
  if images.shape[-1] != 3:
    raise ValueError(
        f'images must have 3 channels last (NHWC), got shape '
        f'{tuple(images.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1).')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f'images must be floating point, normalized as the checkpoint expects '
        f'(mean/std), got dtype {images.dtype}; convert uint8 with '
        'lvtp_jax.data.classification.normalize or (x / 255 - mean) / std.')
  if patch_size is not None:
    h, w = images.shape[1:3]
    if h % patch_size or w % patch_size:
      raise ValueError(
          f'image size {h}x{w} is not divisible by the patch size '
          f'{patch_size}; resize or pad the images to a multiple of '
          f'{patch_size} (e.g. {h // patch_size * patch_size}x'
          f'{w // patch_size * patch_size}).')


class DropPath(nn.Module):
  """Stochastic depth per sample (timm's DropPath); identity when not training."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens (timm's PatchEmbed.proj conv)."""
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images [B, H, W, 3] -> [B, H/p, W/p, D]."""
    p = self.patch_size
    return nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID',
                   dtype=self.dtype, name='proj')(images)


class Attention(nn.Module):
  """Multi-head self-attention over a token buffer with a key mask."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, valid, log_size, *, masked: bool,
               want: FrozenSet[str],
               transform: Optional[Callable[[jax.Array, jax.Array],
                                            jax.Array]] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """x: [B, K, D]; valid: [B, K]; log_size: [B, K] or None; transform:
    (attn [B, H, K, K], valid) -> attn, applied to the normalised map
    before attn @ v and before the signals are read (a policy's
    attention_transform, e.g. GTP's sparsity cut; it materialises the
    map)."""
    b, k, d = x.shape
    h = self.num_heads
    hd = d // h
    qkv = nn.Dense(3 * d, dtype=self.dtype, name='qkv')(x)
    # [3, B, H, K, hd]: heads-major layout, as timm. XLA:CPU runs the two
    # batched matmuls several times faster in this layout than with
    # einsums over the [B, K, H, hd] layout.
    qkv = qkv.reshape(b, k, 3, h, hd).transpose(2, 0, 3, 1, 4)
    q, key, v = qkv[0], qkv[1], qkv[2]
    q = q * (hd ** -0.5)
    # Attention logits and the softmax statistics are float32 whatever the
    # compute dtype (a bfloat16 logit keeps 3 significant digits).
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, key,
                        preferred_element_type=jnp.float32)
    if log_size is not None:
      logits = logits + log_size[:, None, None, :].astype(logits.dtype)
    if masked:
      logits = jnp.where(valid[:, None, None, :], logits, _NEG)
    # Softmax with the normalisation deferred until after attn @ v: dividing
    # the [B, H, K, hd] output instead of the [B, H, K, K] map saves a full
    # pass over the map, which XLA:CPU does not fuse away. Same math as
    # softmax(logits) @ v to float32 rounding.
    shifted = jnp.exp(logits - jax.lax.stop_gradient(
        logits.max(axis=-1, keepdims=True)))
    denom = shifted.sum(axis=-1, keepdims=True)
    attn = None
    if transform is not None:
      attn = transform(shifted / denom, valid)
      out = jnp.einsum('bhqk,bhkd->bhqd', attn.astype(self.dtype), v)
    else:
      out = jnp.einsum('bhqk,bhkd->bhqd', shifted.astype(self.dtype), v)
      out = out / denom.astype(out.dtype)
    out = out.transpose(0, 2, 1, 3).reshape(b, k, d)
    signals = {}
    if want & {'cls_attn', 'attn'}:
      if attn is None:
        attn = shifted / denom
      if 'cls_attn' in want:
        signals['cls_attn'] = attn[:, :, 0, :]
      if 'attn' in want:
        signals['attn'] = attn
    if 'keys' in want:
      signals['keys'] = key
    out = nn.Dense(d, dtype=self.dtype, name='proj')(out)
    return out, signals


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, name='fc2')(x)


class LayerScale(nn.Module):
  """timm's LayerScale: a learned per-channel gain `gamma` (DeiT-III)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', nn.initializers.constant(1e-5),
                       (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block on a TokenState."""
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  drop_path: float = 0.0
  layer_scale: bool = False        # ls1 / ls2 gains after attention and MLP
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, state: ts.TokenState, *, masked: bool = False,
               proportional: bool = False, want: FrozenSet[str] = frozenset(),
               train: bool = False,
               reduce: Optional[Callable[[ts.TokenState, Dict[str, jax.Array]],
                                         ts.TokenState]] = None,
               attn_transform: Optional[Callable[[jax.Array, jax.Array],
                                                 jax.Array]] = None):
    """Returns (new_state, signals); `masked`/`proportional`/`want` are static.

    masked: apply the key mask from `state.valid` (False only when every slot
      is known to be valid, which saves a select per attention logit).
    proportional: add log(size) to the attention logits (ToMe's proportional
      attention).
    want: subset of SIGNALS to return.
    reduce: an in-block reduction (lvtp_jax/pruning/inblock.py), applied to
      the buffer between the attention residual and the MLP, given the
      signals in `want`; the MLP then runs on the buffer it returns.
    attn_transform: a change to the normalised attention map (see
      Attention), e.g. GTP's sparsity cut.
    """
    unknown = set(want) - SIGNALS
    if unknown:
      raise ValueError(f'unknown attention signals {sorted(unknown)}; '
                       f'known: {sorted(SIGNALS)}.')
    norm = lambda name: nn.LayerNorm(
        epsilon=self.ln_eps, use_fast_variance=False, dtype=self.dtype,
        name=name)
    log_size = jnp.log(jnp.maximum(state.size, 1.0)) if proportional else None
    y, signals = Attention(self.num_heads, dtype=self.dtype, name='attn')(
        norm('norm1')(state.x), state.valid, log_size, masked=masked,
        want=frozenset(want), transform=attn_transform)
    if self.layer_scale:
      y = LayerScale(self.dtype, name='ls1')(y)
    state = state.replace(x=state.x + DropPath(self.drop_path)(y, train))
    if reduce is not None:
      state = reduce(state, signals)
    y = Mlp(self.mlp_dim, dtype=self.dtype, name='mlp')(norm('norm2')(state.x))
    if self.layer_scale:
      y = LayerScale(self.dtype, name='ls2')(y)
    x = state.x + DropPath(self.drop_path)(y, train)
    return state.replace(x=x), signals


class ViT(nn.Module):
  """Vision Transformer / DeiT classifier.

  `apply({'params': p}, images)` with float32 NHWC images, normalized as the
  checkpoint expects, returns logits [B, num_classes] (timm eval mode).
  """
  width: int = 384                 # token dimension D
  depth: int = 12                  # number of blocks
  num_heads: int = 6               # attention heads (head dim = D / heads)
  mlp_dim: int = 1536              # hidden size of the block MLP
  patch_size: int = 16             # square patch side in pixels
  img_size: int = 224              # image side the stored pos_embed grid is for
  num_classes: int = 1000          # 0: no head, return the pooled features
  distilled: bool = False          # DeiT distillation token and second head
  ln_eps: float = 1e-6             # timm 1e-6; Segmenter checkpoints 1e-5
  posemb_resize: str = 'bicubic'   # see posemb.METHODS; used when the grid differs
  posemb: str = 'learn'            # posemb.KINDS: a learnt pos_embed, or fixed
                                   # 2-D sine-cosines (no parameter; prefix
                                   # tokens get none)
  layer_scale: bool = False        # per-block LayerScale gains (DeiT-III)
  no_embed_class: bool = False     # pos_embed holds patch rows only; the
                                   # prefix tokens get none (DeiT-III)
  global_pool: str = 'token'       # POOLS: the CLS token, or the size-
                                   # weighted mean of the other tokens
  fc_norm: bool = False            # LayerNorm after pooling instead of
                                   # before it (timm fc_norm; MAE models)
  drop_path_rate: float = 0.0      # stochastic depth, linear over the blocks
  dtype: Any = jnp.float32         # compute dtype (params stay float32;
                                   # LayerNorm statistics, softmax and
                                   # logits stay float32)
  # lvtp_jax.pruning.PruningSpec of an in-block reduction (set by
  # lvtp_jax.pruning.attach); None: the unpruned forward.
  pruning: Optional[Any] = None

  @property
  def num_prefix(self) -> int:
    return 2 if self.distilled else 1

  @property
  def grid(self) -> Tuple[int, int]:
    return self.img_size // self.patch_size, self.img_size // self.patch_size

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads '
                       f'{self.num_heads}.')
    if self.global_pool not in POOLS:
      raise ValueError(f'global_pool={self.global_pool!r} is not one of '
                       f'{POOLS}.')
    if self.global_pool == 'avg' and self.distilled:
      raise ValueError('average pooling with a distillation token is not a '
                       'timm architecture; use global_pool="token".')
    if self.posemb not in posemb_lib.KINDS:
      raise ValueError(f'posemb={self.posemb!r}; expected one of '
                       f'{posemb_lib.KINDS}.')
    d = self.width
    self.patch_embed = PatchEmbed(d, self.patch_size, dtype=self.dtype,
                                  name='patch_embed')
    init = nn.initializers.normal(0.02)
    self.cls_token = self.param('cls_token', nn.initializers.zeros, (1, 1, d))
    if self.distilled:
      self.dist_token = self.param('dist_token', init, (1, 1, d))
    n = self.grid[0] * self.grid[1]
    rows = n if self.no_embed_class else self.num_prefix + n
    if self.posemb == 'learn':
      self.pos_embed = self.param('pos_embed', init, (1, rows, d))
    self.blocks = [
        Block(self.num_heads, self.mlp_dim, self.ln_eps,
              self.drop_path_rate * i / max(self.depth - 1, 1),
              layer_scale=self.layer_scale, dtype=self.dtype,
              name=f'blocks_{i}')
        for i in range(self.depth)]
    layer_norm = lambda name: nn.LayerNorm(
        epsilon=self.ln_eps, use_fast_variance=False, dtype=self.dtype,
        name=name)
    # timm: the final norm moves after the pooling when fc_norm is used.
    self.norm = (lambda x: x) if self.fc_norm else layer_norm('norm')
    if self.fc_norm:
      self.fc_norm_layer = layer_norm('fc_norm')
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, name='head')
      if self.distilled:
        self.head_dist = nn.Dense(self.num_classes, dtype=self.dtype,
                                  name='head_dist')

  def embed(self, images: jax.Array) -> Tuple[ts.TokenState, Tuple[int, int]]:
    """images [B, H, W, 3] -> (TokenState with K = prefix + (H/p)(W/p), grid)."""
    check_images(images, self.patch_size)
    x = self.patch_embed(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
    prefix = [jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in prefix]
    if self.posemb == 'sincos2d':   # the grid's own table; prefix: none
      pe = jnp.asarray(posemb_lib.sincos2d((gh, gw), d), x.dtype)
      return ts.init_state(jnp.concatenate(prefix + [x + pe], axis=1),
                           self.num_prefix), (gh, gw)
    rows = 0 if self.no_embed_class else self.num_prefix
    pe = posemb_lib.resample_posemb(self.pos_embed, rows, (gh, gw),
                                    self.posemb_resize,
                                    old_hw=self.grid).astype(x.dtype)
    if self.no_embed_class:   # timm: add to the patches, then prepend
      x = jnp.concatenate(prefix + [x + pe], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pe
    return ts.init_state(x, self.num_prefix), (gh, gw)

  def run_block(self, i: int, state: ts.TokenState, **kw):
    """Block i on a TokenState; see Block.__call__ for the keywords."""
    return self.blocks[i](state, **kw)

  def pool(self, x: jax.Array, state: Optional[ts.TokenState] = None,
           size_weighted: bool = True) -> jax.Array:
    """Final-normed tokens [B, K, D] -> float32 logits [B, C] (or features
    [B, D] in the compute dtype).

    global_pool 'avg': the mean of the non-prefix tokens; when `state` is
    given, empty slots count not at all and (size_weighted) each token is
    weighted by its size (the patches it stands for), so that merged
    tokens count as the patches they hold (ToMe's rule for MAE models).
    """
    if self.global_pool == 'avg':
      p = self.num_prefix
      if state is None:
        w = jnp.ones(x.shape[:2], jnp.float32)
      elif size_weighted:
        w = state.size * state.valid
      else:
        w = state.valid.astype(jnp.float32)
      w = w[:, p:]
      feats = (jnp.einsum('bk,bkd->bd', w, x[:, p:].astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
               / w.sum(axis=1, keepdims=True)).astype(x.dtype)
    else:
      feats = x[:, 0]
    if self.fc_norm:
      feats = self.fc_norm_layer(feats)
    if not self.num_classes:
      return feats
    logits = self.head(feats).astype(jnp.float32)
    if self.distilled:
      # timm VisionTransformerDistilled: mean of both heads unless
      # distilled_training (never used at evaluation).
      logits = (logits + self.head_dist(x[:, 1]).astype(jnp.float32)) / 2
    return logits

  def __call__(self, images: jax.Array, *, train: bool = False,
               return_aux: bool = False):
    """images [B, H, W, 3] -> logits [B, C] (and aux dict if return_aux).

    aux: 'tokens' [B, K, D] final-normed tokens, 'valid_tokens' [B, depth]
    valid slots entering each block and 'mlp_tokens' [B, depth] valid slots
    each block's MLP ran on (what effective FLOPs are counted from); with
    an in-block reduction (self.pruning) also 'state', the final TokenState
    (sizes, and `src`: the slot of every patch).
    """
    if self.pruning is not None:
      state, aux = pruning_inblock.forward(self, self.pruning, images, train)
    else:
      state, _ = self.embed(images)
      valid_counts = []
      for i in range(self.depth):
        valid_counts.append(state.valid.sum(axis=1))
        state, _ = self.run_block(i, state, train=train)
      counts = jnp.stack(valid_counts, axis=1)
      aux = dict(valid_tokens=counts, mlp_tokens=counts)
    x = self.norm(state.x)
    logits = self.pool(x, state, size_weighted=(
        self.pruning is None or pruning_inblock.size_weighted_pool(
            self.pruning)))
    if not return_aux:
      return logits
    return logits, dict(aux, tokens=x)


def create_vit(variant: str = 'S/16', **kw) -> ViT:
  """ViT from a variant name ('Ti/16', 'S/16', 'B/8', 'L/16', ...) plus overrides."""
  fields = variant_fields(variant)
  fields.update(kw)
  return ViT(**fields)
