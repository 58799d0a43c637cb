"""Official Segmenter checkpoints (rstrudel/segmenter) -> lvtp_jax Segmenter.

A released model is a `checkpoint.pth` ({'model': state_dict, 'optimizer':
..., 'epoch': ...}) next to a `variant.yml` whose `net_kwargs` describe the
network. The encoder keys (`encoder.*`) are timm ViT keys, so the same
rename-and-transpose mapping as for timm applies; the decoder's `cls_emb`,
`proj_patch` and `proj_classes` are raw parameters used as `x @ W` and go in
unchanged. The encoder's 1000-class `head` (and `head_dist`), which the
official factory builds but segmentation never uses, is dropped on purpose.
The number of decoder blocks is read from the keys.
"""

import re
from typing import Any, Dict, Mapping, Tuple

from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.models import segmenter as seg_lib

# segm/data/utils.py STATS, divided by 255 (our images are in [0, 1] before
# normalisation). 'vit' is mean = std = 127.5.
NORMALIZATION = {
    'vit': dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    'deit': dict(mean=(123.68 / 255, 116.28 / 255, 103.53 / 255),
                 std=(58.4 / 255, 57.12 / 255, 57.38 / 255)),
}
_UNUSED_ENCODER_KEYS = re.compile(r'^encoder\.head(_dist)?\.(weight|bias)$')
_DECODER_BLOCK = re.compile(r'^decoder\.blocks\.(\d+)\.')


def read_variant(path: str) -> Dict[str, Any]:
  """Reads a Segmenter `variant.yml`."""
  import yaml  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    variant = yaml.safe_load(f)
  if not isinstance(variant, dict):
    raise ValueError(f'{path} is not a Segmenter variant.yml (it holds '
                     f'{type(variant).__name__}); pass the variant.yml that '
                     'was released beside the checkpoint.')
  return variant


def _net_kwargs(variant: Mapping[str, Any]) -> Mapping[str, Any]:
  net = variant.get('net_kwargs', variant)
  required = ('image_size', 'patch_size', 'd_model', 'n_heads', 'n_layers',
              'n_cls', 'decoder')
  missing = [k for k in required if k not in net]
  if missing:
    raise ValueError(
        f'variant is missing {missing}; pass the contents of the '
        "checkpoint's variant.yml (or its net_kwargs).")
  return net


def decoder_depth_from_keys(state_dict: Mapping[str, Any]) -> int:
  """Number of mask-transformer blocks present in the state dict."""
  ids = {int(m.group(1)) for k in state_dict
         for m in [_DECODER_BLOCK.match(k)] if m}
  return max(ids) + 1 if ids else 0


def model_fields(variant: Mapping[str, Any],
                 decoder_depth: int) -> Dict[str, Any]:
  """Segmenter keyword arguments from variant.yml's net_kwargs."""
  net = _net_kwargs(variant)
  size = net['image_size']
  size = size[0] if isinstance(size, (list, tuple)) else size
  dec = net['decoder']
  name = dec.get('name')
  if name not in seg_lib.DECODERS:
    raise ValueError(f'decoder name {name!r} in the variant is not one of '
                     f'{seg_lib.DECODERS}.')
  if name == 'mask_transformer' and dec.get('n_layers', decoder_depth) != (
      decoder_depth):
    raise ValueError(
        f"variant says decoder n_layers={dec['n_layers']} but the checkpoint "
        f'has decoder.blocks.0..{decoder_depth - 1}; the variant.yml does not '
        'belong to this checkpoint.')
  return dict(
      num_classes=int(net['n_cls']), width=int(net['d_model']),
      depth=int(net['n_layers']), num_heads=int(net['n_heads']),
      mlp_dim=4 * int(net['d_model']), patch_size=int(net['patch_size']),
      img_size=int(size), distilled=bool(net.get('distilled', False)),
      ln_eps=1e-5, posemb_resize='bilinear', decoder=name,
      decoder_depth=decoder_depth if name == 'mask_transformer' else 0)


def data_config(variant: Mapping[str, Any]) -> Dict[str, Any]:
  """Normalisation and the official inference settings of a variant."""
  net = _net_kwargs(variant)
  norm = net.get('normalization', 'vit')
  if norm not in NORMALIZATION:
    raise ValueError(f'normalization {norm!r} unknown; expected one of '
                     f'{sorted(NORMALIZATION)}.')
  size = net['image_size']
  crop = size[0] if isinstance(size, (list, tuple)) else size
  # segm/eval/miou.py: window = crop size, stride = crop - 32.
  return dict(NORMALIZATION[norm], normalization=norm, crop_size=int(crop),
              window_size=int(crop), window_stride=int(crop) - 32)


def from_segmenter(state_dict: Mapping[str, Any], *,
                   variant: Mapping[str, Any]) -> Tuple[Any, Any]:
  """Builds the lvtp_jax Segmenter equal to an official checkpoint.

  Args:
    state_dict: `checkpoint['model']` (or the whole checkpoint dict), NumPy or
      torch values.
    variant: the checkpoint's variant.yml as a dict (or its net_kwargs).

  Returns:
    (model, params): `model.apply({'params': params}, images)` maps float32
    NHWC images, normalised as the variant says, to logits [B, H, W, n_cls]
    at the input resolution, as the official forward.
  """
  sd = timm_convert.unwrap_state_dict(state_dict)
  if not any(k.startswith(('encoder.', 'decoder.')) for k in sd):
    kind = ('a timm ViT / DeiT classifier' if 'patch_embed.proj.weight' in sd
            else 'not a Segmenter checkpoint')
    raise ValueError(
        f'the state dict has no encoder.* / decoder.* keys (first keys: '
        f'{sorted(sd)[:3]}): it is {kind}. An official Segmenter checkpoint '
        'holds both; a classifier is converted with python -m '
        'lvtp_jax.convert timm --model NAME ..., and a Segmenter is trained '
        'from it with config.model.init_from (configs/segmenter_train.py).')
  sd = {k: v for k, v in sd.items() if not _UNUSED_ENCODER_KEYS.match(k)}
  model = seg_lib.Segmenter(**model_fields(variant, decoder_depth_from_keys(sd)))
  grid = (model.img_size // model.patch_size,) * 2
  params = timm_convert.load_params(
      model, sd, num_prefix=model.num_prefix, grid=grid,
      posemb_method=None, posemb_path=('encoder', 'pos_embed'),
      hint='Check that variant.yml belongs to this checkpoint (d_model, '
      'n_layers, n_heads, patch_size, image_size, n_cls, distilled, decoder).')
  return model, params
