"""'none': the unpruned model. Its spec is None, so no pruning code runs."""

from lvtp_jax.pruning import registry


class NoPruning(registry.Policy):
  name = 'none'
  needs_aux_heads = False


registry.register(NoPruning())
