"""Token-pruning policies (DESIGN §1): exit policies for the Segmenter,
in-block reductions for the ViT classifier.

  model = lvtp_jax.pruning.attach(model, config.pruning)
  logits, aux = model.apply({'params': params}, images, return_aux=True)

The pruned model has the parameters of the unpruned one; `attach` puts a
static PruningSpec on it (spec.py). Policies are registered by name
(registry.py); the stage/canvas/buffer machinery is in engine.py; each
policy lives in its own module (none.py, random_exit.py, dtop.py,
lvtp.py with its parts tsallis.py, kmeans.py, lowlevel.py; the in-block
reductions evit.py, tome.py, bat.py, gtp.py and random_drop.py on
inblock.py's forward). A new
policy is one module with a `registry.register(...)` call plus its import
below.

Effective MACs of a pruned forward (DESIGN §2): `effective_macs(model,
aux['tokens_per_block'])`.
"""

from typing import Any

import numpy as np

# Policies register themselves on import.
from lvtp_jax.pruning import bat  # pylint: disable=unused-import
from lvtp_jax.pruning import dtop  # pylint: disable=unused-import
from lvtp_jax.pruning import evit  # pylint: disable=unused-import
from lvtp_jax.pruning import gtp  # pylint: disable=unused-import
from lvtp_jax.pruning import lvtp  # pylint: disable=unused-import
from lvtp_jax.pruning import none  # pylint: disable=unused-import
from lvtp_jax.pruning import random_drop  # pylint: disable=unused-import
from lvtp_jax.pruning import random_exit  # pylint: disable=unused-import
from lvtp_jax.pruning import tome  # pylint: disable=unused-import
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
