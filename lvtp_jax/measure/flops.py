"""The two FLOP counts of DESIGN §2.

realized   what the compiled program does: XLA's cost analysis of the jitted
           forward on one device. The encoder is a Python loop over blocks
           (no scan), so every block is counted; XLA counts 2 FLOPs per
           multiply-accumulate and also counts elementwise work (softmax,
           LayerNorm, GELU), so it sits slightly above the matmul count.
effective  what an ideal ragged implementation would do: multiply-accumulates
           counted analytically from the number of valid tokens entering each
           block, per image. Only matmuls and the patch-embedding conv are
           counted, like fvcore and the papers' tables.

Papers report MACs as "GFLOPs". lvtp_jax reports GFLOPs = 2 x MACs / 1e9
everywhere (results.json, README), and says so.
"""

from typing import Any, Callable, Optional

import jax
import numpy as np


def block_macs(tokens, width: int, mlp_dim: int, mlp_tokens=None):
  """MACs of one pre-norm transformer block on `tokens` tokens.

  qkv (3 D^2) + output projection (D^2) per token, q @ k^T and attn @ v
  (2 K^2 D) over the K tokens, and the MLP (2 D mlp) per token it runs on:
  `mlp_tokens` when an in-block reduction shrank the set between the
  attention residual and the MLP (default: `tokens`).
  """
  k = np.asarray(tokens, np.float64)
  m = k if mlp_tokens is None else np.asarray(mlp_tokens, np.float64)
  return k * 4 * width * width + 2 * k * k * width + m * 2 * width * mlp_dim


def encoder_macs(model: Any, image_hw, tokens_per_block=None,
                 mlp_tokens_per_block=None):
  """(patch count N, MACs of the patch embedding plus all encoder blocks).

  The image is padded to a multiple of the patch (Segmenter does; a ViT
  classifier only accepts multiples). `tokens_per_block` [..., depth]: tokens
  entering each block; default: prefix + all patches everywhere.
  `mlp_tokens_per_block` [..., depth]: tokens each block's MLP runs on
  (in-block reductions); default: the tokens entering the block.
  """
  p = model.patch_size
  n = (-(-image_hw[0] // p)) * (-(-image_hw[1] // p))
  if tokens_per_block is None:
    tokens_per_block = np.full((model.depth,), n + model.num_prefix)
  tokens = np.asarray(tokens_per_block, np.float64)
  for name, value in (('tokens_per_block', tokens),
                      ('mlp_tokens_per_block', mlp_tokens_per_block)):
    if value is not None and np.shape(value)[-1] != model.depth:
      raise ValueError(f'{name} has {np.shape(value)[-1]} entries in its '
                       f'last axis, the model has {model.depth} blocks.')
  blocks = block_macs(tokens, model.width, model.mlp_dim,
                      mlp_tokens_per_block).sum(axis=-1)
  return n, n * 3 * p * p * model.width + blocks


def vit_macs(model: Any, image_hw, tokens_per_block=None,
             mlp_tokens_per_block=None) -> np.ndarray:
  """Analytic MACs per image of a ViT classifier forward.

  Args:
    model: a lvtp_jax ViT (reads width, mlp_dim, depth, patch_size,
      num_classes, distilled).
    image_hw: (H, W) of the input.
    tokens_per_block: [..., depth] tokens entering each block (valid tokens
      for the effective count, buffer capacities for the static count);
      default: no pruning, every block sees prefix + all patches.
    mlp_tokens_per_block: [..., depth] tokens each block's MLP runs on
      (aux['mlp_tokens'] of an in-block reduction); default: as entering.

  Returns:
    MACs with the leading shape of `tokens_per_block` (a scalar by default).
  """
  _, encoder = encoder_macs(model, image_hw, tokens_per_block,
                            mlp_tokens_per_block)
  heads = model.num_classes * model.width * (2 if model.distilled else 1)
  return encoder + heads


def segmenter_macs(model: Any, image_hw, tokens_per_block=None) -> np.ndarray:
  """Analytic MACs per image of a Segmenter forward at image size (H, W).

  Encoder as `vit_macs` (no classification head), plus the decoder on all
  h*w patch tokens and the auxiliary heads on all patch tokens. The final
  bilinear upsampling is not counted (like torch's FlopCounterMode and the
  papers). The image is padded to a multiple of the patch first.

  Args:
    model: a lvtp_jax Segmenter.
    image_hw: (H, W) of the input.
    tokens_per_block: [..., depth] tokens entering each encoder block;
      default: every block sees prefix + all patches.
  """
  n, encoder = encoder_macs(model, image_hw, tokens_per_block)
  d, c = model.width, model.num_classes
  decoder = _decoder_macs(model.decoder, n, d, c, model.decoder_depth)
  aux = len(model.aux_layers) * _decoder_macs(model.aux_head, n, d, c, 1)
  return encoder + decoder + aux


def segmenter_effective_macs(model: Any, tokens_per_block,
                             mlp_tokens_per_block=None, *,
                             dense_decoder: Optional[bool] = None,
                             aux_heads: Optional[bool] = None) -> np.ndarray:
  """Analytic MACs per image of a pruned Segmenter forward (effective count).

  Counts what a ragged implementation would do on the tokens that were
  really valid: the patch embedding of all N patches, every encoder block on
  its valid patch tokens plus the prefix tokens (its MLP on those left after
  an in-block reduction), each auxiliary head on the patch tokens of the
  block it follows (a boundary's head runs before anything exits there), and
  the decoder on the patch tokens of the last block. Decision overhead
  (softmax, top-k, sorting, gathers) is not counted, like every non-matmul
  op. With no pruning this equals `segmenter_macs`.

  Args:
    model: a lvtp_jax Segmenter.
    tokens_per_block: [..., depth] valid patch tokens (prefix excluded) each
      encoder block processed, e.g. aux['tokens_per_block'] of a pruned
      forward. Nothing exits before the first block, so
      tokens_per_block[..., 0] is the patch count N.
    mlp_tokens_per_block: [..., depth] valid patch tokens each block's MLP
      ran on, where an in-block reduction shrank the set inside blocks (aux
      of the same name); default tokens_per_block.
    dense_decoder: the decoder decodes all N patches (an in-block
      reduction's dense reassembly) rather than the last block's tokens;
      default: whether mlp_tokens_per_block is given. A composed policy
      (exits after an in-block reduction) passes False.
    aux_heads: whether the auxiliary heads ran; default: not dense_decoder
      (an in-block reduction runs them only for dense='canvas').

  Returns:
    MACs with the leading shape of `tokens_per_block`.
  """
  tokens = np.asarray(tokens_per_block, np.float64)
  if tokens.shape[-1] != model.depth:
    raise ValueError(f'tokens_per_block has {tokens.shape[-1]} entries in its '
                     f'last axis, the model has {model.depth} blocks.')
  if dense_decoder is None:
    dense_decoder = mlp_tokens_per_block is not None
  if aux_heads is None:
    aux_heads = not dense_decoder
  mlp = tokens if mlp_tokens_per_block is None else np.asarray(
      mlp_tokens_per_block, np.float64)
  d, c, p = model.width, model.num_classes, model.patch_size
  embed = tokens[..., 0] * 3 * p * p * d
  blocks = block_macs(tokens + model.num_prefix, d, model.mlp_dim,
                      None if mlp_tokens_per_block is None
                      else mlp + model.num_prefix).sum(axis=-1)
  decoder = _decoder_macs(model.decoder,
                          tokens[..., 0] if dense_decoder else tokens[..., -1],
                          d, c, model.decoder_depth)
  aux = 0.0
  if aux_heads:
    # The patch tokens after block k: its MLP's.
    aux = sum(_decoder_macs(model.aux_head, mlp[..., k - 1], d, c, 1)
              for k in sorted(set(model.aux_layers)))
  return embed + blocks + decoder + aux


def _decoder_macs(kind: str, n, d: int, c: int, depth: int):
  """MACs of a linear or mask-transformer decoder on n patch tokens."""
  if kind == 'linear':
    return n * d * c
  # proj_dec, blocks over patches + class embeddings, proj_patch,
  # proj_classes, and the patch-class product.
  blocks = depth * block_macs(n + c, d, 4 * d)
  return n * d * d + blocks + n * d * d + c * d * d + n * c * d


def _cost_flops(cost: Any) -> float:
  """The 'flops' entry of a cost analysis (-1 when there is none)."""
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else None
  return float((cost or {}).get('flops', -1.0))


def compiled_flops(compiled: Any) -> float:
  """FLOPs of a compiled program (`jax.jit(f).lower(...).compile()`), as
  XLA's cost analysis counts them after its optimisations."""
  flops = _cost_flops(compiled.cost_analysis())
  if flops < 0:
    raise RuntimeError('XLA cost analysis reported no FLOP count for this '
                       'program on this backend.')
  return flops


def lowered_flops(lowered: Any) -> float:
  """FLOPs of a `jax.jit(f).lower(...)`: XLA's analysis of the unoptimised
  program where the backend offers one (CPU), else of the compiled one (GPU
  backends are plugins whose lowered programs carry no cost analysis)."""
  flops = _cost_flops(lowered.cost_analysis())
  return flops if flops >= 0 else compiled_flops(lowered.compile())


def xla_flops(fn: Callable, *args) -> float:
  """FLOPs XLA's cost analysis reports for jit(fn)(*args) on one device
  (the compiled program). A function that is already jitted is lowered
  as it is, so that the executable its calls compiled is reused."""
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  return compiled_flops(jitted.lower(*args).compile())


def realized_gflops(fn: Callable, *args, batch_size: int) -> float:
  """XLA-counted GFLOPs (2 per MAC) per image of jit(fn)(*args)."""
  return xla_flops(fn, *args) / batch_size / 1e9
