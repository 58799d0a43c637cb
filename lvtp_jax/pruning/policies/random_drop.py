"""The random baseline of in-block reduction: EViT's token counts, a seeded
random choice of the tokens kept.

config.pruning.random_drop: keep_rate, layers (1-based) and fuse_token, as
EViT's (evit.py), so a row here and an EViT row at the same
keep rate run on the same number of tokens in every block. In each listed
block the kept non-prefix tokens are drawn uniformly without replacement
(the k largest of uniform draws from jax.random.PRNGKey(seed) folded with
the block; the draw depends on the image's position in its batch, not on
its content), in the order of their draws; with fuse_token the others are
averaged into one token (equal weights: there is no score to weight by),
appended after the kept ones. What a policy that reads the attention gains
over this row is what its choice is worth.
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.pruning.policies import evit


@dataclasses.dataclass(frozen=True)
class RandomDropParams:
  keep_rate: float
  layers: Tuple[int, ...]
  fuse_token: bool
  seed: int


class RandomDrop(evit.EViT):
  """config.pruning.random_drop: keep_rate, layers, fuse_token, seed."""
  name = 'random_drop'
  signals = frozenset()
  summary = ("The random baseline of in-block reduction: EViT's token "
             'counts in the same `layers`, but the kept patch tokens are a '
             'seeded uniform draw (it depends on the position of the image '
             'in its batch, not on its content).')
  field_help = dict(
      evit.EViT.field_help,
      fuse_token='average the dropped tokens into one token (equal weights: '
                 'there is no score), appended after the kept ones; False '
                 'drops them (their patches get src -1).',
      seed='PRNG seed of the draw (jax.random.PRNGKey(seed) folded with the '
           'block).')

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = super().config_defaults()
    cfg.seed = 0               # PRNG seed of the choice
    return cfg

  def make_params(self, cfg, num_stages):
    base = super().make_params(cfg, num_stages)
    return RandomDropParams(keep_rate=base.keep_rate, layers=base.layers,
                            fuse_token=base.fuse_token, seed=int(cfg.seed))

  def reduce(self, ctx, params):
    p = ctx.num_prefix
    n_in = ctx.state.capacity
    b = ctx.state.x.shape[0]
    key = jax.random.fold_in(jax.random.PRNGKey(params.seed), ctx.layer)
    score = jax.random.uniform(key, (b, n_in - p))
    dropped = n_in - p - evit.kept_count(params.keep_rate, n_in - p)
    weights = jnp.full((b, n_in - p), 1.0 / max(dropped, 1), jnp.float32)
    return evit.fuse(ctx.state, score,
                     evit.kept_count(params.keep_rate, n_in - p), p,
                     params.fuse_token, weights=weights)


registry.register(RandomDrop())
