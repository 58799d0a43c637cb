"""Checkpoint conversion into lvtp_jax models (DESIGN §3).

  from_timm(model_name, state_dict, *, img_size=None) -> (model, params)

`python -m lvtp_jax.convert timm --model NAME --checkpoint FILE --out DIR`
writes a converted directory (see lvtp_jax.pretrained) that configs start from.
"""

from lvtp_jax.convert.readers import read_checkpoint
from lvtp_jax.convert.timm import from_timm

__all__ = ['from_timm', 'read_checkpoint']
