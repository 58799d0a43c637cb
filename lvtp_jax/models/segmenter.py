"""Segmenter (Strudel et al., ICCV 2021) in flax.linen, as the official code.

  pad to a multiple of the patch (bottom/right, value 0) -> ViT encoder ->
  drop the prefix tokens -> decoder (linear or mask transformer) -> bilinear
  upsampling to the padded size -> crop the padding off.

Official-code facts reproduced here (rstrudel/segmenter `segm/model/*.py`,
../shared/specs/weights_and_data.md §2.4-§2.5): every LayerNorm has eps 1e-5;
the position embedding is resized in the forward pass, bilinearly without
antialias, when the token grid differs from the stored one; the mask
transformer appends the class embeddings after the patch tokens, projects
both with raw (D, D) matrices, L2-normalises them without epsilon, and
LayerNorms the masks over the class axis.

The encoder runs on a `TokenState`, and auxiliary heads after chosen encoder
blocks give per-token class logits: the signals DToP and LVTP prune with.
With `pruning` set (lvtp_jax.pruning.attach) the forward runs the policy's
stages (lvtp_jax/pruning/engine.py) with the same parameters; with
pruning=None no pruning code runs.

The decoders and auxiliary heads take an optional `valid` [B, N] patch mask:
a mask-transformer head then ignores invalid patches as attention keys (their
own outputs are junk that the caller discards); a linear head is per-token
and ignores it.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax.models import vit as vit_lib
from lvtp_jax.pruning import engine as pruning_engine
from lvtp_jax.pruning import inblock as pruning_inblock
from lvtp_jax.tokens import state as ts

DECODERS = ('linear', 'mask_transformer')


def _layer_norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype,
                      name=name)


class LinearDecoder(nn.Module):
  """Official DecoderLinear: one Linear from tokens to class logits."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, valid=None, size=None):
    """x [B, N, D] patch tokens -> [B, N, C] logits (per token)."""
    del train, valid, size
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


def _unit_rows(t: jax.Array) -> jax.Array:
  """Official `t / t.norm(dim=-1, keepdim=True)`, no epsilon; the norm is
  taken in float32 and the result returned in t's dtype."""
  t32 = t.astype(jnp.float32)
  return (t32 / jnp.linalg.norm(t32, axis=-1, keepdims=True)).astype(t.dtype)


class MaskTransformer(nn.Module):
  """Official MaskTransformer decoder (class embeddings as extra tokens)."""
  num_classes: int
  width: int                 # d_model of the decoder (= encoder width officially)
  depth: int = 2             # decoder blocks
  num_heads: int = 0         # 0: width // 64, as the official factory
  ln_eps: float = 1e-5
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, valid=None, size=None):
    """x [B, N, D_enc] patch tokens -> [B, N, C] mask logits.

    valid: optional [B, N] bool; invalid patches are masked as keys.
    size: optional [B, N] float32, the patches each token stands for: log
      size is added to its attention logits as a key (proportional
      attention), so a token of size m acts as m copies of it.
    """
    b, n, _ = x.shape
    c, d = self.num_classes, self.width
    heads = self.num_heads or max(d // 64, 1)
    x = nn.Dense(d, dtype=self.dtype, name='proj_dec')(x)
    cls_emb = self.param('cls_emb', nn.initializers.normal(0.02), (1, c, d))
    x = jnp.concatenate(
        [x, jnp.broadcast_to(cls_emb, (b, c, d)).astype(x.dtype)], axis=1)
    state = ts.init_state(x, num_prefix=0)
    if valid is not None:
      state = state.replace(valid=jnp.concatenate(
          [valid, jnp.ones((b, c), bool)], axis=1))
    if size is not None:
      state = state.replace(size=jnp.concatenate(
          [size.astype(jnp.float32), jnp.ones((b, c), jnp.float32)], axis=1))
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      state, _ = vit_lib.Block(heads, 4 * d, self.ln_eps, rate,
                               dtype=self.dtype, name=f'blocks_{i}')(
                                   state, masked=valid is not None,
                                   proportional=size is not None,
                                   train=train)
    x = _layer_norm(self.ln_eps, self.dtype, 'decoder_norm')(state.x)
    init = nn.initializers.normal(d ** -0.5)
    proj_patch = self.param('proj_patch', init, (d, d))
    proj_classes = self.param('proj_classes', init, (d, d))
    patches = _unit_rows(x[:, :n] @ proj_patch.astype(x.dtype))
    classes = _unit_rows(x[:, n:] @ proj_classes.astype(x.dtype))
    masks = jnp.einsum('bnd,bcd->bnc', patches, classes)
    return _layer_norm(self.ln_eps, self.dtype, 'mask_norm')(masks)


class AuxHead(nn.Module):
  """Per-token class logits from intermediate encoder tokens.

  The encoder's intermediate tokens are not normalised (pre-norm blocks), so
  the head starts with its own LayerNorm, then a linear layer ('linear', the
  default) or a one-block mask transformer ('mask_transformer').
  """
  num_classes: int
  kind: str = 'linear'
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, valid=None):
    """x [B, N, D] patch tokens (valid: optional [B, N]) -> [B, N, C] logits."""
    x = _layer_norm(self.ln_eps, self.dtype, 'norm')(x)
    if self.kind == 'linear':
      return LinearDecoder(self.num_classes, self.dtype, name='decoder')(x)
    return MaskTransformer(self.num_classes, x.shape[-1], depth=1,
                           ln_eps=self.ln_eps, dtype=self.dtype,
                           name='decoder')(x, train, valid)


class Segmenter(nn.Module):
  """Segmenter: `apply({'params': p}, images)` -> logits [B, H, W, C].

  images: float32 NHWC, normalised as the checkpoint expects, any H and W.
  """
  num_classes: int = 150           # segmentation classes
  width: int = 384                 # encoder token dimension D
  depth: int = 12                  # encoder blocks
  num_heads: int = 6               # encoder attention heads
  mlp_dim: int = 1536              # encoder MLP hidden size
  patch_size: int = 16             # square patch side in pixels
  img_size: int = 512              # training crop the stored pos_embed is for
  distilled: bool = False          # DeiT backbone with a dist token
  ln_eps: float = 1e-5             # official Segmenter LayerNorm eps
  posemb_resize: str = 'bilinear'  # official forward-time resize of pos_embed
  posemb: str = 'learn'            # encoder position embedding (ViT.posemb)
  decoder: str = 'mask_transformer'  # see DECODERS
  decoder_depth: int = 2           # mask-transformer blocks
  aux_layers: Tuple[int, ...] = ()  # auxiliary heads after these blocks (1-based)
  aux_head: str = 'linear'         # 'linear' or 'mask_transformer'
  drop_path_rate: float = 0.0      # encoder stochastic depth
  decoder_drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  # lvtp_jax.pruning.PruningSpec (set by lvtp_jax.pruning.attach); None:
  # the unpruned forward.
  pruning: Optional[Any] = None

  def setup(self):
    if self.decoder not in DECODERS:
      raise ValueError(f'decoder={self.decoder!r}; expected one of {DECODERS}.')
    if self.aux_head not in DECODERS:
      raise ValueError(f'aux_head={self.aux_head!r}; expected one of '
                       f'{DECODERS}.')
    bad = [k for k in self.aux_layers if not 1 <= k < self.depth]
    if bad:
      raise ValueError(
          f'aux_layers {list(bad)} out of range: an auxiliary head goes after '
          f'block k with 1 <= k < depth={self.depth} (block depth is the '
          'final decoder).')
    self.encoder = vit_lib.ViT(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, patch_size=self.patch_size,
        img_size=self.img_size, num_classes=0, distilled=self.distilled,
        ln_eps=self.ln_eps, posemb_resize=self.posemb_resize,
        posemb=self.posemb,
        drop_path_rate=self.drop_path_rate, dtype=self.dtype, name='encoder')
    if self.decoder == 'linear':
      self.decode_head = LinearDecoder(self.num_classes, self.dtype,
                                       name='decoder')
    else:
      self.decode_head = MaskTransformer(
          self.num_classes, self.width, self.decoder_depth, ln_eps=self.ln_eps,
          drop_path_rate=self.decoder_drop_path_rate, dtype=self.dtype,
          name='decoder')
    self.aux_heads = {
        k: AuxHead(self.num_classes, self.aux_head, self.ln_eps, self.dtype,
                   name=f'aux_head_{k}') for k in self.aux_layers}

  @property
  def num_prefix(self) -> int:
    return 2 if self.distilled else 1

  def _reduced_forward(self, x: jax.Array, train: bool):
    """The encoder with an in-block reduction (EViT, ToMe, BAT, GTP;
    lvtp_jax/pruning/inblock.py), then every patch's token by the spec's
    dense rule (inblock.dense_source) through the decoder (on the grid, or
    on the slots with decode='reduced'). The auxiliary heads run only for
    dense='canvas' (spec.DENSE); aux_logits[k] is then their prediction for
    every patch through src at block k."""
    spec = self.pruning
    taps = tuple(self.aux_layers) if spec.dense == 'canvas' else ()
    state, stats = pruning_inblock.forward(self.encoder, spec, x, train,
                                           taps=taps)
    p = self.patch_size
    grid = (x.shape[1] // p, x.shape[2] // p)
    tokens = self.encoder.norm(state.x)
    slot = pruning_inblock.dense_source(state.src, grid, state.capacity,
                                        spec.dense)
    if spec.decode == 'reduced':
      # The slots, each weighted by the patches that decode from it.
      q = self.num_prefix
      held = pruning_inblock.patches_per_slot(slot, state.capacity)[:, q:]
      slot_logits = self.decode_head(tokens[:, q:], train, valid=held > 0,
                                     size=held)
      token_logits = ts.take_rows(slot_logits, jnp.maximum(slot - q, 0))
    else:
      token_logits = self.decode_head(ts.take_rows(tokens, slot), train)
    aux_logits = {}
    if taps:
      token_logits, aux_logits = self._canvas(token_logits, state,
                                              stats['taps'])
    aux = dict(token_logits=token_logits, aux_logits=aux_logits,
               grid=jnp.asarray(grid, jnp.int32), state=state,
               valid_tokens=stats['valid_tokens'],
               tokens_per_block=stats['valid_tokens'] - self.num_prefix,
               mlp_tokens_per_block=stats['mlp_tokens'] - self.num_prefix)
    return token_logits, aux

  def _canvas(self, token_logits: jax.Array, state: ts.TokenState,
              tapped: Dict[int, ts.TokenState]):
    """dense='canvas': patches not kept at the end take the auxiliary
    head's prediction of their slot at the last auxiliary layer where they
    were still kept (if any). Returns (token_logits, aux_logits)."""
    q = self.num_prefix
    masked = self.pruning.mode == 'masked'
    canvas = token_logits.astype(jnp.float32)
    aux_logits = {}
    for k in sorted(tapped):
      st = tapped[k]
      logits = self.aux_heads[k](
          st.x[:, q:], valid=st.valid[:, q:] if masked else None)
      per_patch = ts.take_rows(logits, jnp.maximum(st.src - q, 0))
      aux_logits[k] = per_patch
      kept = pruning_inblock.kept_patches(st.src, st.capacity)
      canvas = jnp.where(kept[..., None], per_patch.astype(jnp.float32),
                         canvas)
    kept = pruning_inblock.kept_patches(state.src, state.capacity)
    return jnp.where(kept[..., None], token_logits.astype(jnp.float32),
                     canvas), aux_logits

  def __call__(self, images: jax.Array, *, train: bool = False,
               return_aux: bool = False, labels: bool = False):
    """images [B, H, W, 3] -> logits [B, H, W, C] (and aux if return_aux).

    labels=True returns the int32 class map [B, H, W] (the argmax of those
    logits) instead: under jit the upsampling fuses with the argmax and the
    full-resolution logits are never written, which is what a caller that
    only needs labels (whole-image evaluation, the timed forwards) should
    pay.

    aux: 'token_logits' [B, N, C] final per-token logits (before upsampling),
    'aux_logits' {k: [B, N, C]} per auxiliary head (after block k),
    'valid_tokens' [B, depth] valid slots entering each encoder block,
    'grid' the (h, w) token grid as int32 [2].
    With pruning, also (lvtp_jax/pruning/engine.py):
    'exit_stage' int32 [B, N] the stage (0-based over the sorted aux layers)
      each patch exited at, len(aux_layers) for patches that reached the
      decoder; 'tokens_per_block' int32 [B, depth] valid patch tokens each
      block processed (input of lvtp_jax.pruning.effective_macs);
      'overflow' int32 [B, len(aux_layers)] patches force-exited by the
      overflow rule at each stage. token_logits are then the reassembled
      map (decoder for patches that stayed, exit canvas for the others) and
      aux_logits[k] the canvas after head k (its logits where it ran, the
      exit prediction elsewhere).
    """
    vit_lib.check_images(images, None)
    b, h, w, _ = images.shape
    p = self.patch_size
    pad_h, pad_w = -h % p, -w % p
    x = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    tail = lambda t: dense_output(t, p, (h, w), labels)
    if self.pruning is not None and pruning_inblock.is_reduction(self.pruning):
      token_logits, aux = self._reduced_forward(x, train)
      logits = tail(token_logits)
      return (logits, aux) if return_aux else logits
    if self.pruning is not None:
      token_logits, grid, aux = pruning_engine.forward(self, x, train)
      logits = tail(token_logits)
      if not return_aux:
        return logits
      aux.update(token_logits=token_logits, grid=jnp.asarray(grid, jnp.int32))
      return logits, aux
    state, grid = self.encoder.embed(x)
    aux_logits: Dict[int, jax.Array] = {}
    valid_counts = []
    for i in range(self.depth):
      valid_counts.append(state.valid.sum(axis=1))
      state, _ = self.encoder.run_block(i, state, train=train)
      if i + 1 in self.aux_heads:
        aux_logits[i + 1] = self.aux_heads[i + 1](
            state.x[:, self.num_prefix:], train)
    tokens = self.encoder.norm(state.x)[:, self.num_prefix:]
    token_logits = self.decode_head(tokens, train)
    logits = tail(token_logits)
    if not return_aux:
      return logits
    aux = dict(token_logits=token_logits, aux_logits=aux_logits,
               valid_tokens=jnp.stack(valid_counts, axis=1),
               grid=jnp.asarray(grid, jnp.int32))
    return logits, aux


def _taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Two-tap bilinear weights along one axis (align_corners=False).

  Output index o samples the input at s = (o + 0.5) n_in / n_out - 0.5,
  clamped below at 0 (torch's rule); taps lo = floor(s) and
  hi = min(lo + 1, n_in - 1), weight s - lo on hi.
  """
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (src - lo).astype(np.float32)


def bilinear_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C], bilinear, align_corners=False, no antialias.

  The map of torch's F.interpolate(mode='bilinear') and of
  jax.image.resize(..., 'linear', antialias=False) (tested against both).
  Along W it is a product with the static [W, w] two-tap matrix (at full
  float32 precision, so accelerators do not round it to bf16/tf32); along H
  a static two-tap gather and blend of whole rows. Measured alone on the dev
  CPU (2 cores, jax 0.10.2) for a batch of 16 quickstart logit maps
  (8 x 8 -> 128 x 128, 10 classes): jax.image.resize 3.5 ms, gathers and
  blends along both axes 2.3 ms, this 0.74 ms. The product also makes XLA
  write the small input map once: fused into the blends, whatever produced
  it (with pruning, the canvas reassembly) was recomputed for every tap of
  every output pixel.
  """
  x = x.astype(jnp.float32)
  h, w = x.shape[1:3]
  if w != size[1]:
    lo, hi, t = _taps(w, size[1])
    m = np.zeros((size[1], w), np.float32)
    np.add.at(m, (np.arange(size[1]), lo), 1.0 - t)
    np.add.at(m, (np.arange(size[1]), hi), t)
    x = jnp.einsum('Ww,bhwc->bhWc', jnp.asarray(m), x,
                   precision=jax.lax.Precision.HIGHEST)
  if h != size[0]:
    lo, hi, t = _taps(h, size[0])
    a = jnp.take(x, lo, axis=1)
    b = jnp.take(x, hi, axis=1)
    x = a + (b - a) * jnp.asarray(t).reshape(1, -1, 1, 1)
  return x


def upsample(token_logits: jax.Array, grid: Sequence[int],
             size: Sequence[int]) -> jax.Array:
  """[B, h*w, C] per-token logits -> [B, H, W, C], bilinear (align_corners=False).

  The official code calls F.interpolate(mode='bilinear') without antialias;
  `bilinear_resize` is that map.
  """
  b, _, c = token_logits.shape
  grid_logits = token_logits.reshape(b, grid[0], grid[1], c)
  return bilinear_resize(grid_logits, size)


def dense_output(token_logits: jax.Array, patch_size: int,
                 size: Sequence[int], labels: bool) -> jax.Array:
  """The Segmenter's tail: upsample_cropped logits [B, h, w, C], or with
  labels=True their argmax [B, h, w] int32."""
  logits = upsample_cropped(token_logits, patch_size, size)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32) if labels else logits


def upsample_cropped(token_logits: jax.Array, patch_size: int,
                     size: Sequence[int]) -> jax.Array:
  """Token logits of an (h, w) image -> [B, h, w, C], the Segmenter's rule.

  The image was padded to a multiple of the patch; the token grid is
  upsampled to the padded size and cropped back to (h, w).
  """
  h, w = size
  gh, gw = -(-h // patch_size), -(-w // patch_size)
  return upsample(token_logits, (gh, gw),
                  (gh * patch_size, gw * patch_size))[:, :h, :w]
