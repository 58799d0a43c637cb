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


# name part -> (width, depth, heads) of timm's ViT/DeiT sizes.
_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6),
          'medium': (512, 12, 8), 'base': (768, 12, 12),
          'large': (1024, 24, 16), 'huge': (1280, 32, 16)}
_NAME_RE = re.compile(r'^(deit3|deit|vit)_(tiny|small|medium|base|large|huge)'
                      r'(_distilled)?_patch(\d+)_(\d+)$')
# What lvtp_jax's ViT has of timm's VisionTransformer.
SUPPORTED = ('a class token (and a DeiT distillation token), a learned '
             'position embedding with or without rows for them, LayerNorm, '
             'exact GELU, qkv with bias, layer scale, CLS-token or average '
             'pooling, fc_norm')


def _meta_model(timm, torch, model_name: str):
  """timm's module of `model_name` on the meta device, its weight init
  skipped where the class allows it (6x faster; shapes are all we read)."""
  with torch.device('meta'):
    try:
      return timm.create_model(model_name, pretrained=False,
                               weight_init='skip')
    except TypeError:  # a class without the weight_init argument
      return timm.create_model(model_name, pretrained=False)


def _timm_architecture(model_name: str) -> Dict[str, Any]:
  """model_config from timm's own module of `model_name` (timm installed).

  The module is built on PyTorch's meta device (shapes only, no weights)
  and its modules are read: every size, patch and resolution timm registers
  is taken as it is, and whatever lvtp_jax's ViT cannot express is named.
  """
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    m = _meta_model(timm, torch, model_name)
  except RuntimeError as e:  # timm: "Unknown model (...)"
    raise ValueError(
        f'unknown timm model {model_name!r} ({e}); lvtp_jax converts timm '
        'VisionTransformer models (vit_*, deit_*, deit3_*; see '
        "timm.list_models('vit_*')).") from None
  identity = torch.nn.Identity
  is_identity = lambda module, name: isinstance(
      getattr(module, name, None) or identity(), identity)
  missing = []
  kind = type(m).__name__
  if kind not in ('VisionTransformer', 'VisionTransformerDistilled'):
    missing.append(f'the {kind} architecture')
  else:
    b = m.blocks[0]
    if type(b).__name__ != 'Block':
      missing.append(f'{type(b).__name__} blocks')
    else:
      qkv = getattr(b.attn, 'qkv', None)
      if qkv is None or qkv.bias is None:
        missing.append('a qkv projection without bias (or split q, k, v)')
      if not all(is_identity(b.attn, a) for a in ('q_norm', 'k_norm',
                                                   'norm')):
        missing.append('q/k or attention-output normalisation')
      act = getattr(b.mlp, 'act', None)
      if (type(b.mlp).__name__ != 'Mlp' or type(act).__name__ != 'GELU'
          or getattr(act, 'approximate', 'none') != 'none'):
        missing.append(f'a {type(b.mlp).__name__} MLP with '
                       f'{type(act).__name__} (lvtp_jax: Mlp with exact '
                       'GELU)')
      if type(b.norm1).__name__ != 'LayerNorm':
        missing.append(f'{type(b.norm1).__name__} normalisation')
    if getattr(m, 'cls_token', None) is None:
      missing.append('no class token')
    if getattr(m, 'reg_token', None) is not None:
      missing.append('register tokens')
    if not is_identity(m, 'norm_pre'):
      missing.append('a LayerNorm before the blocks (pre_norm, as CLIP)')
    if m.global_pool not in vit_lib.POOLS:
      missing.append(f'{m.global_pool!r} pooling')
    if getattr(m, 'pos_embed', None) is None:
      missing.append('no learned position embedding')
    if is_identity(m, 'norm') and is_identity(m, 'fc_norm'):
      missing.append('no final LayerNorm')
    if type(m.patch_embed).__name__ != 'PatchEmbed':
      missing.append(f'a {type(m.patch_embed).__name__} patch embedding')
    elif not is_identity(m.patch_embed, 'norm'):
      missing.append('a norm in the patch embedding')
  if missing:
    raise ValueError(
        f"timm model {model_name!r} needs what lvtp_jax's ViT does not "
        f'have: {"; ".join(missing)}. Supported: {SUPPORTED}.')
  patch, img = m.patch_embed.patch_size, m.patch_embed.img_size
  if patch[0] != patch[1] or img[0] != img[1]:
    raise ValueError(f'timm model {model_name!r} has non-square patches or '
                     f"input ({patch}, {img}); lvtp_jax's ViT is square.")
  cfg = m.pretrained_cfg
  return dict(
      model=dict(width=m.embed_dim, depth=len(m.blocks),
                 num_heads=m.blocks[0].attn.num_heads,
                 mlp_dim=m.blocks[0].mlp.fc1.out_features,
                 patch_size=patch[0], img_size=img[0],
                 distilled=getattr(m, 'dist_token', None) is not None,
                 ln_eps=m.blocks[0].norm1.eps, posemb_resize='bicubic',
                 layer_scale=not is_identity(m.blocks[0], 'ls1'),
                 no_embed_class=bool(m.no_embed_class),
                 global_pool=m.global_pool,
                 fc_norm=not is_identity(m, 'fc_norm')),
      data=dict(mean=tuple(cfg['mean']), std=tuple(cfg['std']),
                crop_pct=cfg['crop_pct'],
                interpolation=cfg['interpolation'],
                img_size=cfg['input_size'][-1]))


def _name_architecture(model_name: str) -> Dict[str, Any]:
  """model_config from the name alone (timm not installed): the plain
  {vit,deit,deit3}_<size>[_distilled]_patch<P>_<R> family."""
  m = _NAME_RE.match(model_name)
  if m is None:
    raise ValueError(
        f'cannot read the architecture of timm model {model_name!r} from '
        'its name; without timm installed lvtp_jax knows the names '
        '{vit,deit,deit3}_{tiny,small,medium,base,large,huge}[_distilled]'
        '_patch<P>_<R> (e.g. deit_small_patch16_224). Install timm '
        '(requirements-parity.txt) to convert any timm ViT it expresses.')
  family, size, distilled, patch, img = m.groups()
  width, depth, heads = _SIZES[size]
  img = int(img)
  deit = family.startswith('deit')
  return dict(
      model=dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                 patch_size=int(patch), img_size=img,
                 distilled=bool(distilled), ln_eps=1e-6,
                 posemb_resize='bicubic', layer_scale=family == 'deit3',
                 no_embed_class=family == 'deit3', global_pool='token',
                 fc_norm=False),
      data=dict(
          mean=(constants.IMAGENET_DEFAULT_MEAN if deit
                else constants.IMAGENET_INCEPTION_MEAN),
          std=(constants.IMAGENET_DEFAULT_STD if deit
               else constants.IMAGENET_INCEPTION_STD),
          crop_pct=1.0 if family == 'deit3' or img != 224 else 0.9,
          interpolation='bicubic', img_size=img))


def model_config(model_name: str) -> Dict[str, Any]:
  """Architecture and data config of a timm ViT/DeiT model name.

  With timm installed, read from timm's own module for that name: any
  registered vit_* / deit_* / deit3_* model that lvtp_jax's ViT expresses,
  and a ValueError naming what it cannot (register tokens, CLIP's pre-norm,
  ...). Without timm, from the name (the plain family, _name_architecture).
  A ".tag" suffix (".fb_in1k") is accepted; the data config is that tag's
  (timm) or the family's default.

  Returns:
    dict(model=ViT keyword arguments without num_classes, data=dict(mean,
    std, crop_pct, interpolation, img_size)).
  """
  try:
    import timm  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return _name_architecture(model_name.split('.')[0])
  return _timm_architecture(model_name)


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
    model_name: a timm ViT/DeiT name (model_config), optionally with a
      ".tag".
    state_dict: timm parameter name -> array (NumPy or torch), e.g. from
      `timm_model.state_dict()`, a `.safetensors` or a `.pth` file (see
      lvtp_jax.convert.readers). The number of classes is read from `head`;
      a state dict without `head` gives a features-only model; one with
      `fc_norm` and no `norm` (a model fine-tuned with timm's
      global_pool='avg', e.g. MAE's) gives average pooling with fc_norm.
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
  sd = unwrap_state_dict(state_dict)
  if 'fc_norm.weight' in sd and 'norm.weight' not in sd:
    # Fine-tuned with average pooling (timm global_pool='avg', as the MAE
    # fine-tunes): the final norm sits after the pooling.
    fields.update(global_pool='avg', fc_norm=True)
  if img_size is not None:
    if img_size % fields['patch_size']:
      raise ValueError(
          f'img_size {img_size} is not divisible by the patch size '
          f'{fields["patch_size"]} of {model_name}.')
    fields['img_size'] = int(img_size)
  head = sd.get('head.weight')
  fields['num_classes'] = int(head.shape[0]) if head is not None else 0
  model = vit_lib.ViT(**fields)
  params = load_params(model, sd,
                       num_prefix=0 if model.no_embed_class else
                       model.num_prefix,
                       grid=model.grid, posemb_method='bicubic')
  return model, params
