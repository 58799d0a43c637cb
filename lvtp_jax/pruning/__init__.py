"""Token-pruning policies (DESIGN §1): exit policies for the Segmenter,
in-block reductions for the ViT classifier.

  model = lvtp_jax.pruning.attach(model, config.pruning)
  logits, aux = model.apply({'params': params}, images, return_aux=True)

The pruned model has the parameters of the unpruned one; `attach` puts a
static PruningSpec on it (spec.py). The framework is this folder: the
registry of policies by name (registry.py), config.pruning -> PruningSpec
(spec.py), the stage/canvas/buffer machinery (engine.py), the ViT forward
of the in-block reductions (inblock.py), stable ranking (ranking.py) and
`python -m lvtp_jax.pruning` (describe.py). The methods are in policies/,
one module per policy (LVTP a package with its parts); a new policy is one
module there with a `registry.register(...)` call plus its import in
policies/__init__.py.

The policies' old module paths (lvtp_jax.pruning.tome, .lvtp, .lowlevel,
...) still import, as the same module objects (_MOVED below); reaching one
as an attribute of this package (`from lvtp_jax.pruning import tome`,
`pruning.tome.merge`) warns (DeprecationWarning) with the new path.

Effective MACs of a pruned forward (DESIGN §2): `effective_macs(model,
aux['tokens_per_block'])`.
"""

import importlib
import sys
from typing import Any
import warnings

import numpy as np

# Policies register themselves on import.
from lvtp_jax.pruning import policies  # pylint: disable=unused-import
from lvtp_jax.measure import flops
from lvtp_jax.pruning.engine import decision_flops
from lvtp_jax.pruning.registry import get
from lvtp_jax.pruning.registry import names
from lvtp_jax.pruning.registry import Policy
from lvtp_jax.pruning.registry import register
from lvtp_jax.pruning.registry import SIGNALS
from lvtp_jax.pruning.registry import StageContext
from lvtp_jax.pruning.spec import attach
from lvtp_jax.pruning.spec import AUX_SOURCES
from lvtp_jax.pruning.spec import build_spec
from lvtp_jax.pruning.spec import COMPOSE
from lvtp_jax.pruning.spec import kind
from lvtp_jax.pruning.spec import parts
from lvtp_jax.pruning.spec import config_defaults
from lvtp_jax.pruning.spec import MODES
from lvtp_jax.pruning.spec import OVERFLOW_RULES
from lvtp_jax.pruning.spec import PruningSpec
from lvtp_jax.pruning.spec import REASSEMBLE
from lvtp_jax.pruning.spec import resolve
from lvtp_jax.pruning.spec import summary


def effective_macs(model: Any, tokens_per_block) -> np.ndarray:
  """Per-image MACs of a (pruned) Segmenter forward; see flops.py.

  Args:
    model: the Segmenter.
    tokens_per_block: [..., depth] valid patch tokens each encoder block
      processed (aux['tokens_per_block']).

  Returns:
    [...] MACs of patch embedding, encoder, auxiliary heads and decoder.
  """
  return flops.segmenter_effective_macs(model, tokens_per_block)


# Where the policy modules were before policies/ (old name -> new module).
_MOVED = {
    'bat': 'policies.bat', 'dtop': 'policies.dtop', 'evit': 'policies.evit',
    'gtp': 'policies.gtp', 'lvtp': 'policies.lvtp', 'none': 'policies.none',
    'random_drop': 'policies.random_drop',
    'random_exit': 'policies.random_exit', 'tome': 'policies.tome',
    'kmeans': 'policies.lvtp.kmeans', 'lowlevel': 'policies.lvtp.lowlevel',
    'tsallis': 'policies.lvtp.tsallis',
}
# `import lvtp_jax.pruning.tome` and `from lvtp_jax.pruning.tome import
# merge` find the moved module here (no second copy: same objects, and a
# monkeypatch of one is a monkeypatch of the other) ...
for _old, _new in _MOVED.items():
  sys.modules[f'{__name__}.{_old}'] = importlib.import_module(
      f'{__name__}.{_new}')
del _old, _new


def __getattr__(name: str) -> Any:
  """... and `from lvtp_jax.pruning import tome` or `pruning.tome.merge`
  warn, naming the new path."""
  if name in _MOVED:
    package, _, module = f'{__name__}.{_MOVED[name]}'.rpartition('.')
    warnings.warn(
        f'{__name__}.{name} is deprecated: the module is now '
        f'{package}.{module} (`from {package} import {module}`).',
        DeprecationWarning, stacklevel=2)
    return sys.modules[f'{__name__}.{name}']
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
