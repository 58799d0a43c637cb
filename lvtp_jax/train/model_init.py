"""The Segmenter to train and its initial parameters, from config.model.

Random init: the architecture comes from config.model.variant ('Ti/16', ...)
with any non-zero width / depth / num_heads / mlp_dim / patch_size fields
overriding it, or from those fields alone when variant is ''.

From a converted ImageNet ViT / DeiT (python -m lvtp_jax.convert timm; the
official recipe's starting point): see _segmenter_from_backbone.

From a converted Segmenter or a train.py workdir (config.model.init_from,
e.g. the phase-1 run a pruning fine-tune starts from; its latest
checkpoint is used): the architecture is the checkpoint's, plus the
config's auxiliary heads and drop-path rate. The
encoder and decoder weights come from the checkpoint; parameters the
checkpoint lacks (the auxiliary heads) keep their fresh initialisation and
are reported, so nothing is initialised silently.

Pruning (config.pruning, lvtp_jax.pruning) adds no parameters: the model is
built unpruned here and the training loop attaches the policy, so phase 2
(the pruning fine-tune) starts from the weights of phase 1 and trains with
the decisions live.
"""

from typing import Any, Dict, List, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvtp_jax import models
from lvtp_jax import pretrained
from lvtp_jax.convert import segmenter as seg_convert
from lvtp_jax.models import posemb as posemb_lib
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import checkpoint

_SHAPE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')


def _random_init_kwargs(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  kwargs = vit_lib.variant_fields(cfg.variant) if cfg.variant else {}
  kwargs.update({k: cfg[k] for k in _SHAPE_FIELDS if cfg.get(k)})
  missing = [k for k in _SHAPE_FIELDS if k not in kwargs]
  if missing:
    raise ValueError(
        f'config.model needs a variant (e.g. "Ti/16") or non-zero {missing}.')
  return dict(kwargs, num_classes=cfg.num_classes, img_size=cfg.img_size,
              decoder=cfg.decoder, decoder_depth=cfg.decoder_depth,
              posemb=cfg.get('posemb', 'learn'))


def merge_params(loaded: Any, fresh: Any) -> Tuple[Any, List[str]]:
  """Loaded values where they exist, fresh ones elsewhere.

  Args:
    loaded: parameters from a checkpoint.
    fresh: a full initialisation of the model to train.

  Returns:
    (params, initialised): the merged tree and the '/'-joined paths taken
    from `fresh`.

  Raises:
    ValueError: the checkpoint has parameters the model lacks, or shapes
      differ.
  """
  old = traverse_util.flatten_dict(loaded, sep='/')
  new = traverse_util.flatten_dict(fresh, sep='/')
  extra = sorted(set(old) - set(new))
  if extra:
    raise ValueError(f'the checkpoint has parameters the model lacks: '
                     f'{extra[:5]}; is it the same architecture?')
  bad = [f'{k}: {old[k].shape} vs {new[k].shape}' for k in old
         if old[k].shape != new[k].shape]
  if bad:
    raise ValueError(f'checkpoint shapes differ from the model: {bad[:5]}.')
  merged = {k: jnp.asarray(old.get(k, v)) for k, v in new.items()}
  return (traverse_util.unflatten_dict(merged, sep='/'),
          sorted(set(new) - set(old)))


def _segmenter_from_backbone(vit: vit_lib.ViT, vit_params: Any,
                             cfg: ml_collections.ConfigDict,
                             train_fields: Dict[str, Any]):
  """A Segmenter whose encoder starts from an ImageNet ViT / DeiT.

  As the official Segmenter does when it builds a model from a timm
  backbone: the encoder takes the backbone's architecture at the training
  crop cfg.img_size with LayerNorm eps 1e-5 (the official ViT's; the
  weights were trained with timm's 1e-6, the official code loads them
  unchanged), the position embedding's patch grid is resized bilinearly
  (no antialias) from the backbone's grid to crop / patch, and the
  classification head is dropped. The decoder (and auxiliary heads) start
  from scratch.

  Returns:
    (model, params): the Segmenter and the encoder parameters to load.
  """
  model = seg_lib.Segmenter(
      num_classes=cfg.num_classes, width=vit.width, depth=vit.depth,
      num_heads=vit.num_heads, mlp_dim=vit.mlp_dim,
      patch_size=vit.patch_size, img_size=cfg.img_size,
      distilled=vit.distilled, decoder=cfg.decoder,
      decoder_depth=cfg.decoder_depth, posemb=vit.posemb, **train_fields)
  if cfg.img_size % vit.patch_size:
    raise ValueError(f'model.img_size={cfg.img_size} is not a multiple of the '
                     f'backbone patch size {vit.patch_size}.')
  encoder = {k: v for k, v in vit_params.items()
             if k not in ('head', 'head_dist')}
  side = cfg.img_size // vit.patch_size
  if vit.posemb == 'learn':
    encoder['pos_embed'] = np.asarray(posemb_lib.resample_posemb(
        np.asarray(encoder['pos_embed'], np.float32), vit.num_prefix,
        (side, side), 'bilinear', old_hw=vit.grid))
  return model, {'encoder': encoder}


def _check_shape(cfg: ml_collections.ConfigDict, source: Any) -> None:
  """Refuses an init_from whose encoder shape is not the config's.

  The config's shape is its variant with non-zero fields overriding it;
  with variant '' and every shape field 0 the checkpoint's shape is taken.
  """
  wanted = vit_lib.variant_fields(cfg.variant) if cfg.get('variant') else {}
  wanted.update({k: cfg[k] for k in _SHAPE_FIELDS if cfg.get(k)})
  diffs = [f'model.{k}: {v} in the config, {getattr(source, k)} in '
           f'{cfg.init_from}' for k, v in sorted(wanted.items())
           if k in _SHAPE_FIELDS and getattr(source, k) != v]
  wanted_posemb = cfg.get('posemb') or 'learn'
  if source.posemb != wanted_posemb:
    diffs.append(f'model.posemb: {wanted_posemb!r} in the config, '
                 f'{source.posemb!r} in {cfg.init_from}')
  if diffs:
    raise ValueError(
        'config.model.init_from has another encoder shape than the config:'
        '\n  ' + '\n  '.join(diffs) + '\nSet the config fields to the '
        "checkpoint's (or model.variant='' and the shape fields to 0 to take "
        'them from the checkpoint), or point init_from at a checkpoint of '
        'this shape.')


def build(cfg: ml_collections.ConfigDict, seed: int, strict_shape: bool = True
          ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any], List[str]]:
  """(model, params, prep, initialised) for training.

  Args:
    cfg: config.model.
    seed: initialisation seed.
    strict_shape: with init_from, refuse a checkpoint whose encoder shape
      (width, depth, num_heads, mlp_dim, patch_size) differs from the
      config's (training: config.json must describe the model trained).
      Evaluation passes False: a converted model brings its own shape.

  Returns:
    model: the Segmenter (with cfg's aux heads and drop-path rate),
      computing in cfg.dtype ('float32' or 'bfloat16'; parameters are
      float32 either way).
    params: initial parameters (host/default-device arrays).
    prep: dict(mean, std) in 0..1 units the images must be normalised with.
    initialised: parameter paths that are freshly initialised although a
      checkpoint was loaded ([] for random init).
  """
  train_fields = dict(aux_layers=tuple(cfg.aux_layers), aux_head=cfg.aux_head,
                      drop_path_rate=cfg.get('drop_path_rate', 0.0))
  if cfg.init_from:
    source, loaded, prep = checkpoint.load_weights(cfg.init_from)
    fields = pretrained.module_fields(source)
    if strict_shape and isinstance(source, (vit_lib.ViT, seg_lib.Segmenter)):
      _check_shape(cfg, source)
    if isinstance(source, vit_lib.ViT):
      model, loaded = _segmenter_from_backbone(source, loaded, cfg,
                                               train_fields)
    elif isinstance(source, seg_lib.Segmenter):
      model = models.build('segmenter', dict(fields, **train_fields))
    else:
      raise ValueError(f'{cfg.init_from} holds a {type(source).__name__} '
                       'model; segmentation training needs a Segmenter or a '
                       'ViT backbone.')
  else:
    if not cfg.random_init:
      raise ValueError(
          'config.model.init_from is empty: point it at a converted Segmenter '
          '(python -m lvtp_jax.convert segmenter ...) or set '
          '--config.model.random_init=True.')
    model = seg_lib.Segmenter(**_random_init_kwargs(cfg), **train_fields)
    loaded = None
    prep = dict(seg_convert.NORMALIZATION[cfg.normalization])
  model = models.with_dtype(model, cfg.get('dtype', 'float32'))
  x = jnp.zeros((1, model.img_size, model.img_size, 3))
  fresh = jax.jit(model.init)(jax.random.PRNGKey(seed), x)['params']
  if loaded is None:
    return model, fresh, prep, []
  params, initialised = merge_params(loaded, fresh)
  return model, params, prep, initialised
