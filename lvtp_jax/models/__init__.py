"""Model registry: architecture name -> flax module class, and compute dtypes."""

from typing import Any, Dict

import jax.numpy as jnp

from lvtp_jax.models import segmenter
from lvtp_jax.models import vit

ARCHITECTURES = {'vit': vit.ViT, 'segmenter': segmenter.Segmenter}

# config.model.dtype -> compute dtype. Parameters stay float32 either way;
# with 'bfloat16' the matmuls, convolutions and the residual stream run in
# bfloat16 while LayerNorm statistics, the attention softmax, losses and
# every pruning decision stay in float32 (models/vit.py, pruning/engine.py).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype; a ValueError names the choices."""
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r} is not one of '
                     f'{sorted(DTYPES)}.')
  return DTYPES[name]


def with_dtype(model: Any, name: str) -> Any:
  """`model` computing in dtype `name` (same parameters; see DTYPES)."""
  dtype = compute_dtype(name)
  return model if model.dtype == dtype else model.clone(dtype=dtype)


def build(architecture: str, kwargs: Dict[str, Any]):
  """Instantiates a registered architecture from its keyword arguments."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {architecture!r}; known: '
                     f'{sorted(ARCHITECTURES)}.')
  kwargs = dict(kwargs)
  if 'aux_layers' in kwargs:  # JSON turns tuples into lists
    kwargs['aux_layers'] = tuple(kwargs['aux_layers'])
  return ARCHITECTURES[architecture](**kwargs)
