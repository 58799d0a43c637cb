"""Converted pretrained weights on disk: an Orbax checkpoint plus model.json.

Layout of a converted directory (written by `python -m lvtp_jax.convert`):
  DIR/params/      Orbax (StandardCheckpointer) parameter tree
  DIR/model.json   {"format", "architecture", "model": module kwargs,
                    "data": preprocessing the weights expect, "source": ...}
A config names DIR in `config.model.init_from`; `load` rebuilds the module and
restores the parameters.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import jax
import orbax.checkpoint as ocp

from lvtp_jax import models

FORMAT = 'lvtp_jax.pretrained/1'
# Module fields that are not part of the stored architecture: flax
# bookkeeping, the compute dtype, and the evaluation-time pruning policy.
_NOT_STORED = ('parent', 'name', 'dtype', 'pruning')


def module_fields(model) -> Dict[str, Any]:
  """A module's constructor fields as JSON-friendly values (see _NOT_STORED)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in _NOT_STORED}


def save(out_dir: str, params: Any, meta: Dict[str, Any],
         overwrite: bool = False) -> None:
  """Writes params and metadata; refuses to replace an existing directory."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, 'model.json')) and not overwrite:
    raise FileExistsError(
        f'{out_dir} already holds a converted model; pass --overwrite to '
        'replace it or choose another --out.')
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, 'params'), params, force=overwrite)
  ckptr.wait_until_finished()
  meta = dict(meta, format=FORMAT)
  with open(os.path.join(out_dir, 'model.json'), 'w') as f:
    json.dump(meta, f, indent=2)


def load(path: str) -> Tuple[Any, Any, Dict[str, Any]]:
  """Returns (module, params, meta) of a converted directory."""
  path = os.path.abspath(path)
  meta_file = os.path.join(path, 'model.json')
  if not os.path.exists(meta_file):
    raise FileNotFoundError(
        f'{path} is not a converted model (no model.json). Create one with '
        '`python -m lvtp_jax.convert timm --model NAME --checkpoint FILE '
        f'--out {path}`.')
  with open(meta_file) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{meta_file} has format {meta.get("format")!r}, '
                     f'expected {FORMAT!r}; convert the checkpoint again.')
  module = models.build(meta['architecture'], meta['model'])
  params = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'))
  params = jax.tree_util.tree_map(jax.numpy.asarray, params)
  return module, params, meta
