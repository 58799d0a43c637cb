"""Model registry: architecture name -> flax module class."""

from typing import Any, Dict

from lvtp_jax.models import segmenter
from lvtp_jax.models import vit

ARCHITECTURES = {'vit': vit.ViT, 'segmenter': segmenter.Segmenter}


def build(architecture: str, kwargs: Dict[str, Any]):
  """Instantiates a registered architecture from its keyword arguments."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {architecture!r}; known: '
                     f'{sorted(ARCHITECTURES)}.')
  kwargs = dict(kwargs)
  if 'aux_layers' in kwargs:  # JSON turns tuples into lists
    kwargs['aux_layers'] = tuple(kwargs['aux_layers'])
  return ARCHITECTURES[architecture](**kwargs)
