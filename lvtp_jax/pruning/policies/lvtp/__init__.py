"""'lvtp': LVTP-R, low-level-feature-guided progressive token pruning.

  policy.py    the exit policy: config.pruning.lvtp, the per-boundary
               decision (uncertainty, twice clustering, guards, budget)
  tsallis.py   multi-scale Tsallis entropy and its dynamic weights (the
               uncertainty U of a patch)
  kmeans.py    masked k-means with a fixed number of Lloyd iterations (the
               clustering passes)
  lowlevel.py  per-patch low-level image features (Sobel edges, colour
               variance): the edge score e of a patch

The names below are the policy's public ones (policy.py's docstring has
the algorithm); the policy registers when this package is imported.
"""

from lvtp_jax.pruning.policies.lvtp.policy import CLUSTERINGS
from lvtp_jax.pruning.policies.lvtp.policy import context_grid
from lvtp_jax.pruning.policies.lvtp.policy import exit_decisions
from lvtp_jax.pruning.policies.lvtp.policy import label_boundary
from lvtp_jax.pruning.policies.lvtp.policy import LVTP
from lvtp_jax.pruning.policies.lvtp.policy import LVTPParams
from lvtp_jax.pruning.policies.lvtp.policy import neighbourhood_mean
from lvtp_jax.pruning.policies.lvtp.policy import PRUNED_FILL
from lvtp_jax.pruning.policies.lvtp.policy import uncertainty
