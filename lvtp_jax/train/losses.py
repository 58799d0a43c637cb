"""Segmentation losses: pixel cross-entropy and auxiliary per-token heads.

An auxiliary head is trained either like the final head (`upsample_like`,
then `pixel_cross_entropy`; train.aux_loss='pixel') or per token
(train.aux_loss='token'). Per-token target: the majority label of the patch's
pixels, ignoring 255; ties go to the lowest class id (argmax order), and a
patch whose pixels are all ignored has no target and is left out of the loss.
This is the "dominant class" a token's prediction is scored against in the
token-accuracy diagnostics.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from lvtp_jax.models import segmenter

IGNORE_INDEX = 255


def upsample_like(token_logits: jax.Array, labels: jax.Array,
                  patch_size: int) -> jax.Array:
  """[B, N, C] token logits -> [B, H, W, C] at the size of labels [B, H, W]
  (segmenter.upsample_cropped, after checking that N is the patch grid)."""
  _, h, w = labels.shape
  gh, gw = -(-h // patch_size), -(-w // patch_size)
  if token_logits.shape[1] != gh * gw:
    raise ValueError(
        f'{token_logits.shape[1]} token logits do not form the {gh}x{gw} '
        f'grid of {h}x{w} labels with patch {patch_size}.')
  return segmenter.upsample_cropped(token_logits, patch_size, (h, w))


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Mean cross-entropy over the non-ignored pixels of the whole batch.

  Args:
    logits: [B, H, W, C] float.
    labels: [B, H, W] int, class ids or ignore_index.
    ignore_index: label value that contributes nothing.

  Returns:
    Scalar float32: the mean over valid pixels (0 if there are none), as
    torch's CrossEntropyLoss(ignore_index=...) with 'mean' reduction.
  """
  return _masked_ce(logits, labels, labels != ignore_index)


def token_targets(labels: jax.Array, patch_size: int,
                  num_classes: int, ignore_index: int = IGNORE_INDEX
                  ) -> Tuple[jax.Array, jax.Array]:
  """Majority label per patch (see the module docstring).

  Args:
    labels: [B, H, W] int with H and W multiples of patch_size.
    patch_size: patch side p.
    num_classes: C; labels outside [0, C) other than ignore_index count as
      ignored too.
    ignore_index: label value that is never a target.

  Returns:
    (targets int32 [B, N], valid bool [B, N]) with N = (H / p) * (W / p) in
    row-major patch order, the order of the encoder's tokens.
  """
  b, h, w = labels.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'label map {h}x{w} is not a multiple of the patch '
                     f'size {p}; use a crop size divisible by {p}.')
  del ignore_index  # one_hot of an out-of-range id (255) is all zeros.
  patches = labels.reshape(b, h // p, p, w // p, p)
  counts = jax.nn.one_hot(patches, num_classes, dtype=jnp.int32).sum((2, 4))
  counts = counts.reshape(b, (h // p) * (w // p), num_classes)
  return jnp.argmax(counts, -1).astype(jnp.int32), counts.sum(-1) > 0


def token_cross_entropy(token_logits: jax.Array, targets: jax.Array,
                        valid: jax.Array) -> jax.Array:
  """Mean cross-entropy over valid tokens: [B, N, C], [B, N], [B, N] -> []."""
  return _masked_ce(token_logits, targets, valid)


def _masked_ce(logits, labels, valid):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)
