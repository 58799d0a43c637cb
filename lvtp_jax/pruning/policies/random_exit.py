"""'random': exits a seeded random subset of the active patches (sanity floor).

At stage boundary s, floor(exit_fraction[s] x active patches) of the active
patches of each image exit, chosen uniformly at random; their prediction
comes from the exit canvas like any exited patch, and reassembly is the same
as DToP's. `exit_fraction` is a fraction of the patches still active at that
boundary (so after two stages at 0.5, a quarter remains), one value per
auxiliary layer or one value for all of them.

Reproducibility: the draw for patch n of an image at stage s is a counter-
based hash (murmur3's 32-bit finaliser) of (seed, s, image hash, n), where
the image hash is the wrapping uint32 sum of the image's float bits. Integer
arithmetic is exact, so the choice is a deterministic function of (seed,
stage, image): independent of the batch the image is in, of the device
layout and of the backend, identical in masked and buffer mode, and
different between images. (A hash rather than jax.random: the same
guarantees, and it compiles faster on XLA:CPU.) Ties in the
24-bit draws go to the lower patch index.
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvtp_jax.pruning import registry
from lvtp_jax.pruning import spec as spec_lib
from lvtp_jax.pruning.policies import dtop


@dataclasses.dataclass(frozen=True)
class RandomParams:
  exit_fraction: Tuple[float, ...]   # per stage
  seed: int


def image_hash(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] float32 -> [B] uint32, the wrapping sum of the pixel bits."""
  bits = jax.lax.bitcast_convert_type(images.astype(jnp.float32), jnp.uint32)
  return jnp.sum(bits, axis=(1, 2, 3), dtype=jnp.uint32)


def _mix(x: jax.Array) -> jax.Array:
  """murmur3 fmix32: a bijective, well-mixing uint32 -> uint32 map."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform_draws(seed: int, stage: int, image_hashes: jax.Array,
                  num_patches: int) -> jax.Array:
  """[B] uint32 image hashes -> [B, N] float32 draws in [0, 1)."""
  golden = np.uint32(0x9E3779B9)
  salt = _mix(jnp.uint32(seed % 2 ** 32) * golden + jnp.uint32(stage))
  image_key = _mix(image_hashes.astype(jnp.uint32) ^ salt)
  patch_key = _mix(jnp.arange(num_patches, dtype=jnp.uint32) * golden + salt)
  bits = _mix(image_key[:, None] ^ patch_key[None, :])
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def random_exits(draws: jax.Array, ctx: registry.StageContext,
                 fraction: float) -> jax.Array:
  """[B, Kp] bool: floor(fraction x active) random active slots per image.

  Args:
    draws: [B, N] per-patch uniform draws; the lowest ones exit.
    ctx: the boundary's StageContext.
    fraction: the fraction of active patches that exit.
  """
  u = ctx.patch_to_slot(draws, fill=2.0)
  rank = registry.ranks(jnp.where(ctx.valid, u, 2.0))
  count = jnp.floor(fraction * ctx.valid.sum(axis=1).astype(jnp.float32))
  return ctx.valid & (rank < count.astype(rank.dtype)[:, None])


class RandomExit(registry.Policy):
  """config.pruning.random: exit_fraction, seed, reassemble."""
  name = 'random'
  signals = frozenset({'image'})
  summary = ('Exit baseline (the sanity floor): at every stage boundary a '
             'random floor(`exit_fraction` x active) of the active patches of '
             'each image exit, drawn by a hash of (`seed`, stage, image '
             'content, patch): the same choice in masked and buffer mode and '
             'in any batch.')
  field_help = {
      'exit_fraction': 'fraction of the patches still active at a stage '
                       'boundary that exit there (floor per image): one value '
                       'per boundary or one for all of them (after two '
                       'boundaries at 0.5 a quarter remains).',
      'seed': 'seed of the hash that draws the exits; the draw also depends '
              'on the stage and on the image content, not on its position '
              'in the batch.',
      'reassemble': dtop.REASSEMBLE_HELP,
  }

  def config_defaults(self) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.exit_fraction = (0.5,)  # of the active patches, per stage (or one)
    cfg.seed = 0
    cfg.reassemble = 'logits'
    return cfg

  def make_params(self, cfg, num_stages):
    fractions = tuple(float(f) for f in spec_lib.per_stage(
        cfg.exit_fraction, num_stages, 'config.pruning.random.exit_fraction',
        0.5))
    if any(not 0.0 <= f <= 1.0 for f in fractions):
      raise ValueError(
          f'config.pruning.random.exit_fraction={tuple(cfg.exit_fraction)}: '
          'every entry is a fraction of the active patches in [0, 1].')
    return RandomParams(exit_fraction=fractions, seed=int(cfg.seed))

  def prepare(self, images, params, *, normalization, patch_size):
    del params, normalization, patch_size
    return image_hash(images)

  def decide(self, ctx, params):
    draws = uniform_draws(params.seed, ctx.stage, ctx.prepared,
                          ctx.num_patches)
    return random_exits(draws, ctx, params.exit_fraction[ctx.stage])


registry.register(RandomExit())
