"""The Segmenter to train and its initial parameters, from config.model.

Random init: the architecture comes from config.model.variant ('Ti/16', ...)
with any non-zero width / depth / num_heads / mlp_dim / patch_size fields
overriding it, or from those fields alone when variant is ''.

From a converted Segmenter (config.model.init_from): the architecture is the
checkpoint's, plus the config's auxiliary heads and drop-path rate. The
encoder and decoder weights come from the checkpoint; parameters the
checkpoint lacks (the auxiliary heads) keep their fresh initialisation and
are reported, so nothing is initialised silently.
"""

from typing import Any, Dict, List, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax import models
from lvtp_jax import pretrained
from lvtp_jax.convert import segmenter as seg_convert
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib

_SHAPE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')


def _random_init_kwargs(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  kwargs = vit_lib.variant_fields(cfg.variant) if cfg.variant else {}
  kwargs.update({k: cfg[k] for k in _SHAPE_FIELDS if cfg.get(k)})
  missing = [k for k in _SHAPE_FIELDS if k not in kwargs]
  if missing:
    raise ValueError(
        f'config.model needs a variant (e.g. "Ti/16") or non-zero {missing}.')
  return dict(kwargs, num_classes=cfg.num_classes, img_size=cfg.img_size,
              decoder=cfg.decoder, decoder_depth=cfg.decoder_depth)


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


def build(cfg: ml_collections.ConfigDict, seed: int
          ) -> Tuple[seg_lib.Segmenter, Any, Dict[str, Any], List[str]]:
  """(model, params, prep, initialised) for training.

  Args:
    cfg: config.model.
    seed: initialisation seed.

  Returns:
    model: the Segmenter (with cfg's aux heads and drop-path rate).
    params: initial parameters (host/default-device arrays).
    prep: dict(mean, std) in 0..1 units the images must be normalised with.
    initialised: parameter paths that are freshly initialised although a
      checkpoint was loaded ([] for random init).
  """
  train_fields = dict(aux_layers=tuple(cfg.aux_layers), aux_head=cfg.aux_head,
                      drop_path_rate=cfg.drop_path_rate)
  if cfg.init_from:
    _, loaded, meta = pretrained.load(cfg.init_from)
    if meta['architecture'] != 'segmenter':
      raise ValueError(f'{cfg.init_from} holds a {meta["architecture"]!r} '
                       'model; segmentation training needs a converted '
                       'Segmenter.')
    model = models.build('segmenter', dict(meta['model'], **train_fields))
    prep = meta['data']
  else:
    if not cfg.random_init:
      raise ValueError(
          'config.model.init_from is empty: point it at a converted Segmenter '
          '(python -m lvtp_jax.convert segmenter ...) or set '
          '--config.model.random_init=True.')
    model = seg_lib.Segmenter(**_random_init_kwargs(cfg), **train_fields)
    loaded = None
    prep = dict(seg_convert.NORMALIZATION[cfg.normalization])
  x = jnp.zeros((1, model.img_size, model.img_size, 3))
  fresh = jax.jit(model.init)(jax.random.PRNGKey(seed), x)['params']
  if loaded is None:
    return model, fresh, prep, []
  params, initialised = merge_params(loaded, fresh)
  return model, params, prep, initialised
