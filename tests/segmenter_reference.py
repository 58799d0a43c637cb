"""NumPy reference of the official Segmenter forward (rstrudel/segmenter).

Written from the official code's behaviour as the spec records it
(../shared/specs/weights_and_data.md §2.3-§2.5), in float64, on the torch
state-dict layout, sharing no code with lvtp_jax. The official package cannot
be installed here (its factory breaks on timm 1.0 and its data code needs
mmcv), so this is the oracle the Flax port is tested against.
"""

import math

import numpy as np
from scipy.special import erf


def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _linear(x, sd, name):
  return x @ sd[name + '.weight'].T + sd[name + '.bias']


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _block(x, sd, p, heads):
  """segm/model/blocks.py Block: pre-norm, scale applied after q @ k^T."""
  b, n, d = x.shape
  hd = d // heads
  y = _ln(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'])
  qkv = _linear(y, sd, p + 'attn.qkv').reshape(b, n, 3, heads, hd)
  qkv = qkv.transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  attn = _softmax((q @ k.transpose(0, 1, 3, 2)) * hd ** -0.5)
  y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  x = x + _linear(y, sd, p + 'attn.proj')
  y = _ln(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias'])
  y = _linear(_gelu(_linear(y, sd, p + 'mlp.fc1')), sd, p + 'mlp.fc2')
  return x + y


def _source_index(out_size, in_size):
  """torch bilinear, align_corners=False: source coords and weights."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0
  return i0, i1, w1


def bilinear_nchw(x, out_hw):
  """F.interpolate(x, out_hw, mode='bilinear', align_corners=False)."""
  y0, y1, wy = _source_index(out_hw[0], x.shape[2])
  x0, x1, wx = _source_index(out_hw[1], x.shape[3])
  rows = (x[:, :, y0, :] * (1 - wy)[None, None, :, None] +
          x[:, :, y1, :] * wy[None, None, :, None])
  return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx


def _patch_embed(im, w, b, p):
  """Conv2d(kernel p, stride p) as a patch matmul. im [B, 3, H, W]."""
  bsz, c, h, wid = im.shape
  gh, gw = h // p, wid // p
  patches = im.reshape(bsz, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(bsz, gh * gw, c * p * p)
  return patches @ w.reshape(w.shape[0], -1).T + b, (gh, gw)


def encoder(im, sd, net):
  """segm/model/vit.py VisionTransformer.forward(return_features=True)."""
  p = net['patch_size']
  x, (gh, gw) = _patch_embed(im, sd['encoder.patch_embed.proj.weight'],
                             sd['encoder.patch_embed.proj.bias'], p)
  b = x.shape[0]
  prefix = [np.broadcast_to(sd['encoder.cls_token'], (b, 1, x.shape[-1]))]
  if net.get('distilled'):
    prefix.append(np.broadcast_to(sd['encoder.dist_token'],
                                  (b, 1, x.shape[-1])))
  n_prefix = len(prefix)
  x = np.concatenate(prefix + [x], axis=1)
  pe = sd['encoder.pos_embed']
  if pe.shape[1] != x.shape[1]:  # resize_pos_embed in the forward pass
    old = int(math.sqrt(pe.shape[1] - n_prefix))
    grid = pe[:, n_prefix:].reshape(1, old, old, -1).transpose(0, 3, 1, 2)
    grid = bilinear_nchw(grid, (gh, gw)).transpose(0, 2, 3, 1)
    pe = np.concatenate([pe[:, :n_prefix], grid.reshape(1, gh * gw, -1)], 1)
  x = x + pe
  for i in range(net['n_layers']):
    x = _block(x, sd, f'encoder.blocks.{i}.', net['n_heads'])
  x = _ln(x, sd['encoder.norm.weight'], sd['encoder.norm.bias'])
  return x, n_prefix, (gh, gw)


def decoder(x, sd, net, grid):
  """DecoderLinear / MaskTransformer; returns masks [B, n_cls, gh, gw]."""
  n_cls = net['n_cls']
  b, n, _ = x.shape
  if net['decoder']['name'] == 'linear':
    masks = _linear(x, sd, 'decoder.head')
  else:
    x = _linear(x, sd, 'decoder.proj_dec')
    d = x.shape[-1]
    x = np.concatenate(
        [x, np.broadcast_to(sd['decoder.cls_emb'], (b, n_cls, d))], axis=1)
    i = 0
    while f'decoder.blocks.{i}.norm1.weight' in sd:
      x = _block(x, sd, f'decoder.blocks.{i}.', d // 64)
      i += 1
    x = _ln(x, sd['decoder.decoder_norm.weight'], sd['decoder.decoder_norm.bias'])
    patches = x[:, :-n_cls] @ sd['decoder.proj_patch']
    cls = x[:, -n_cls:] @ sd['decoder.proj_classes']
    patches = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
    cls = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
    masks = patches @ cls.transpose(0, 2, 1)
    masks = _ln(masks, sd['decoder.mask_norm.weight'],
                sd['decoder.mask_norm.bias'])
  return masks.reshape(b, grid[0], grid[1], n_cls).transpose(0, 3, 1, 2)


def segmenter_forward(im_nhwc, sd, net):
  """segm/model/segmenter.py Segmenter.forward; NHWC in, [B, H, W, C] out."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  im = np.asarray(im_nhwc, np.float64).transpose(0, 3, 1, 2)
  h, w = im.shape[2:]
  p = net['patch_size']
  pad_h, pad_w = -h % p, -w % p
  im = np.pad(im, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
  x, n_prefix, grid = encoder(im, sd, net)
  masks = decoder(x[:, n_prefix:], sd, net, grid)
  masks = bilinear_nchw(masks, (h + pad_h, w + pad_w))[:, :, :h, :w]
  return masks.transpose(0, 2, 3, 1)
