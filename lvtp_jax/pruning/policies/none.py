"""'none': the unpruned model. Its spec is None, so no pruning code runs."""

from lvtp_jax.pruning import registry


class NoPruning(registry.Policy):
  name = 'none'
  needs_aux_heads = False
  summary = ('The unpruned model: its spec is None, so no pruning code runs '
             '(the reference every pruned row is compared with).')


registry.register(NoPruning())
