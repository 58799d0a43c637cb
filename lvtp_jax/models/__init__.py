"""Model registry: architecture name -> flax module class."""

from typing import Any, Dict

from lvtp_jax.models import vit

ARCHITECTURES = {'vit': vit.ViT}


def build(architecture: str, kwargs: Dict[str, Any]):
  """Instantiates a registered architecture from its keyword arguments."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {architecture!r}; known: '
                     f'{sorted(ARCHITECTURES)}.')
  return ARCHITECTURES[architecture](**kwargs)
