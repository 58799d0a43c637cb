"""`python -m lvtp_jax.pruning [policy ...] [--general]`: lists the
registered pruning policies and the config.pruning fields (describe.py)."""

import sys

from lvtp_jax.pruning import describe

if __name__ == '__main__':
  sys.exit(describe.main())
