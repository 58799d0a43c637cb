"""The pruning methods, one module (or package) per registered policy.

Each module defines a `registry.Policy` subclass and registers it at its
bottom; importing this package (which `import lvtp_jax.pruning` does)
registers them all. The framework they plug into is one folder up:
registry.py (what a policy declares and sees), spec.py (config.pruning ->
PruningSpec), engine.py (stages, exit canvas, buffers, reassembly) and
inblock.py (the ViT forward of the in-block reductions).

  none.py         'none': the unpruned model (no pruning code runs)
Exit policies (at stage boundaries; how many exit depends on the image):
  random_exit.py  'random': a seeded random subset exits (the sanity floor)
  dtop.py         'dtop': DToP, confident patches exit
  lvtp/           'lvtp': LVTP-R; policy.py with its parts tsallis.py
                  (multi-scale Tsallis entropy), kmeans.py (masked k-means)
                  and lowlevel.py (Sobel edge features of the image)
In-block reductions (inside a block; token counts set by the config):
  evit.py         'evit': keep the most CLS-attended tokens, fuse the rest
  tome.py         'tome': bipartite soft matching merges r tokens a block
  bat.py          'bat': cluster the inattentive tokens (DPC-KNN), merge
                  the attentive ones by ToMe's matching
  gtp.py          'gtp': graph-based token propagation
  random_drop.py  'random_drop': EViT's counts, a random choice (baseline)

A new policy is one module here plus its import below
(docs/extending.md).
"""

# Policies register themselves on import.
from lvtp_jax.pruning.policies import bat  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import dtop  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import evit  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import gtp  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import lvtp  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import none  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import random_drop  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import random_exit  # pylint: disable=unused-import
from lvtp_jax.pruning.policies import tome  # pylint: disable=unused-import
