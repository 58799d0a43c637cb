"""A tiny Segmenter with auxiliary heads for the pruning tests (CPU-fast).

4 x 4 patches of 8 pixels (32 x 32 images), width 32, 3 blocks, auxiliary
heads after blocks 1 and 2, C = 5 classes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax.models import segmenter as seg_lib

C = 5
HW = 32           # 4 x 4 patches of 8 pixels
N = (HW // 8) ** 2
AUX = (1, 2)
B = 3


def model(**kw) -> seg_lib.Segmenter:
  fields = dict(num_classes=C, width=32, depth=3, num_heads=2, mlp_dim=64,
                patch_size=8, img_size=HW, decoder='linear',
                decoder_depth=1, aux_layers=AUX, aux_head='linear')
  fields.update(kw)
  return seg_lib.Segmenter(**fields)


def random_params(module, x_shape=(1, HW, HW, 3), seed=0, scale=0.3):
  """Random parameters without compiling the initialisers (slow on XLA:CPU)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32),
      shapes)


def images(seed, batch=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, HW, HW, 3))
