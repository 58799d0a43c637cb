"""Checkpoint conversion into lvtp_jax models (DESIGN §3).

  from_timm(model_name, state_dict, *, img_size=None) -> (model, params)
  from_segmenter(state_dict, *, variant) -> (model, params)

`python -m lvtp_jax.convert {timm,segmenter} ...` writes a converted directory
(see lvtp_jax.pretrained) that configs start from.
"""

from lvtp_jax.convert.readers import read_checkpoint
from lvtp_jax.convert.segmenter import from_segmenter
from lvtp_jax.convert.timm import from_timm

__all__ = ['from_segmenter', 'from_timm', 'read_checkpoint']
