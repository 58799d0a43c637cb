"""timm ViT / DeiT state dicts -> lvtp_jax ViT parameters.

The Flax parameter tree uses timm's module names, so the mapping is a rename
(`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/kernel`) plus layout changes:
Linear weights are transposed to Flax (in, out) kernels, the patch-embedding
Conv2d goes OIHW -> HWIO, LayerNorm `weight` becomes `scale`. Conversion is
strict: every expected parameter must be present with its exact shape, and
nothing may be left over; the one exception is the position embedding, whose
patch grid is resampled as timm's own loader does when the image size differs.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax.data import constants
from lvtp_jax.models import posemb as posemb_lib
from lvtp_jax.models import vit as vit_lib


_SIZES = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L'}

# The timm architectures this converter knows (timm 1.0.31 names; a ".tag"
# suffix such as ".fb_in1k" is accepted and ignored). Every one of them is
# checked against timm's own registry in tests/test_convert_timm.py.
KNOWN_MODELS = (
    'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
    'deit_base_patch16_384',
    'deit_tiny_distilled_patch16_224', 'deit_small_distilled_patch16_224',
    'deit_base_distilled_patch16_224', 'deit_base_distilled_patch16_384',
    'vit_tiny_patch16_224', 'vit_tiny_patch16_384',
    'vit_small_patch16_224', 'vit_small_patch16_384',
    'vit_small_patch32_224', 'vit_small_patch32_384',
    'vit_base_patch8_224',
    'vit_base_patch16_224', 'vit_base_patch16_384',
    'vit_base_patch32_224', 'vit_base_patch32_384',
    'vit_large_patch16_224', 'vit_large_patch16_384',
    'vit_large_patch32_384',
)
_NAME_RE = re.compile(
    r'^(deit|vit)_(tiny|small|base|large)(_distilled)?_patch(\d+)_(\d+)$')


def model_config(model_name: str) -> Dict[str, Any]:
  """Architecture and data config of a known timm model name.

  Returns:
    dict(model=ViT keyword arguments without num_classes, data=dict(mean, std,
    crop_pct, interpolation, img_size)), as timm's pretrained config for the
    default tag.
  """
  base = model_name.split('.')[0]
  if base not in KNOWN_MODELS:
    raise ValueError(
        f'unknown timm model {model_name!r}. Known models: '
        f'{", ".join(KNOWN_MODELS)}.')
  family, size, distilled, patch, img = _NAME_RE.match(base).groups()
  fields = vit_lib.variant_fields(f'{_SIZES[size]}/{patch}')
  fields.update(img_size=int(img), distilled=bool(distilled), ln_eps=1e-6,
                posemb_resize='bicubic')
  deit = family == 'deit'
  data = dict(
      mean=(constants.IMAGENET_DEFAULT_MEAN if deit
            else constants.IMAGENET_INCEPTION_MEAN),
      std=(constants.IMAGENET_DEFAULT_STD if deit
           else constants.IMAGENET_INCEPTION_STD),
      crop_pct=0.9 if int(img) == 224 else 1.0,
      interpolation='bicubic',
      img_size=int(img))
  return dict(model=fields, data=data)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Takes the state dict out of a training checkpoint and makes it NumPy.

  Accepts what timm's checkpoint filter accepts ({'model': sd} from the DeiT
  releases, {'state_dict': sd}) and torch tensors as values.
  """
  for key in ('model', 'state_dict'):
    inner = state_dict.get(key) if hasattr(state_dict, 'get') else None
    if isinstance(inner, Mapping):
      state_dict = inner
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, 'detach'):  # torch.Tensor, without importing torch
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else (
          v.detach().cpu().numpy())
    out[k] = np.asarray(v)
  return out


def timm_to_flax_path(key: str) -> Tuple[str, ...]:
  """'blocks.3.attn.qkv.weight' -> ('blocks_3', 'attn', 'qkv', 'kernel')."""
  parts = key.split('.')
  path = []
  i = 0
  while i < len(parts):
    if parts[i] == 'blocks' and i + 1 < len(parts) and parts[i + 1].isdigit():
      path.append(f'blocks_{parts[i + 1]}')
      i += 2
    else:
      path.append(parts[i])
      i += 1
  return tuple(path)


def flax_to_timm_key(path: Tuple[str, ...]) -> str:
  """The inverse of timm_to_flax_path, for error messages and export."""
  parts = []
  for p in path:
    m = re.fullmatch(r'blocks_(\d+)', p)
    parts.extend(['blocks', m.group(1)] if m else [p])
  if parts[-1] in ('kernel', 'scale'):
    parts[-1] = 'weight'
  return '.'.join(parts)


def convert_array(key: str, value: np.ndarray) -> Tuple[Tuple[str, ...],
                                                        np.ndarray]:
  """One timm tensor -> (Flax path, array in Flax layout)."""
  path = timm_to_flax_path(key)
  if path[-1] == 'weight':
    if value.ndim == 4:    # Conv2d OIHW -> HWIO
      return path[:-1] + ('kernel',), value.transpose(2, 3, 1, 0)
    if value.ndim == 2:    # Linear (out, in) -> (in, out)
      return path[:-1] + ('kernel',), value.T
    if value.ndim == 1:    # LayerNorm
      return path[:-1] + ('scale',), value
  return path, value


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def expected_shapes(model, input_hw: Tuple[int, int] = None
                    ) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flat Flax path -> shape of every parameter of `model` (no compute)."""
  input_hw = input_hw or (model.img_size, model.img_size)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_hw) + (3,), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def load_params(model, state_dict: Mapping[str, np.ndarray], *,
                num_prefix: int, grid: Tuple[int, int], posemb_method: str,
                posemb_path: Tuple[str, ...] = ('pos_embed',),
                hint: str = 'Check the model name / variant against the '
                'checkpoint.') -> Dict[str, Any]:
  """Strictly maps a (NumPy) state dict onto the parameters of `model`.

  Args:
    model: the Flax module whose parameters are filled.
    state_dict: source name -> array.
    num_prefix: prefix rows of `pos_embed` (kept as they are when resampling).
    grid: the patch grid the model's `pos_embed` is for.
    posemb_method: resampling method (posemb.METHODS) for a grid mismatch,
      or None to treat a grid mismatch as a shape error.
    posemb_path: Flax path of the position embedding.
    hint: last line of the mismatch error (how to fix it).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped key (in the
    source's names) when the state dict does not fit the model.
  """
  expected = expected_shapes(model)
  converted, sources = {}, {}
  for key, value in state_dict.items():
    path, arr = convert_array(key, value)
    converted[path] = arr
    sources[path] = key
  pe_path = tuple(posemb_path)
  if posemb_method and pe_path in converted and pe_path in expected:
    pe = converted[pe_path]
    want = expected[pe_path]
    if pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == want[2] and (
        pe.shape[1] != want[1]):
      n_old = pe.shape[1] - num_prefix
      side = int(round(np.sqrt(max(n_old, 0))))
      if side * side == n_old:
        converted[pe_path] = posemb_lib.resample_posemb(
            pe.astype(np.float32), num_prefix, grid, posemb_method)
  missing = sorted(set(expected) - set(converted))
  unexpected = sorted(set(converted) - set(expected))
  mismatched = sorted(
      p for p in set(expected) & set(converted)
      if tuple(converted[p].shape) != expected[p])
  if missing or unexpected or mismatched:
    lines = []
    if missing:
      lines.append('missing keys (in the model, not in the checkpoint): ' +
                   ', '.join(flax_to_timm_key(p)
                             for p in missing))
    if unexpected:
      lines.append('unexpected keys (in the checkpoint, not in the model): ' +
                   ', '.join(sources[p] for p in unexpected))
    if mismatched:
      lines.append('shape mismatches: ' + ', '.join(
          f'{sources[p]} {tuple(state_dict[sources[p]].shape)} -> '
          f'{tuple(converted[p].shape)} vs model {expected[p]}'
          for p in mismatched))
    raise ValueError(
        'checkpoint does not match the model:\n  ' + '\n  '.join(lines) +
        '\n' + hint)
  return _unflatten({p: jnp.asarray(converted[p], jnp.float32)
                     for p in expected})


def from_timm(model_name: str, state_dict: Mapping[str, Any], *,
              img_size: Optional[int] = None):
  """Builds the lvtp_jax ViT equal to a timm model and its parameters.

  Args:
    model_name: a timm name from KNOWN_MODELS, optionally with a ".tag".
    state_dict: timm parameter name -> array (NumPy or torch), e.g. from
      `timm_model.state_dict()`, a `.safetensors` or a `.pth` file (see
      lvtp_jax.convert.readers). The number of classes is read from `head`;
      a state dict without `head` gives a features-only model.
    img_size: input side to build the model for; the position-embedding grid
      is resampled (bicubic, antialiased, prefix rows untouched) like timm's
      loader when it differs from the checkpoint's.

  Returns:
    (model, params): `model.apply({'params': params}, images)` maps float32
    NHWC images [B, H, W, 3], normalized with the model's mean/std, to logits
    [B, num_classes] equal to timm's eval-mode output.
  """
  cfg = model_config(model_name)
  fields = dict(cfg['model'])
  if img_size is not None:
    if img_size % fields['patch_size']:
      raise ValueError(
          f'img_size {img_size} is not divisible by the patch size '
          f'{fields["patch_size"]} of {model_name}.')
    fields['img_size'] = int(img_size)
  sd = unwrap_state_dict(state_dict)
  head = sd.get('head.weight')
  fields['num_classes'] = int(head.shape[0]) if head is not None else 0
  model = vit_lib.ViT(**fields)
  params = load_params(model, sd, num_prefix=model.num_prefix,
                       grid=model.grid, posemb_method='bicubic')
  return model, params
