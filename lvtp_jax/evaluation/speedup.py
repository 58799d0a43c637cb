"""Realized GFLOPs and throughput of one evaluated setting, and its speed-up
over the unpruned model: the part of a results row that classification and
segmentation evaluation measure alike (DESIGN §2, §7).

Speed is a ratio inside one run: the setting's forward and the unpruned
one are timed in interleaved rounds after warm-up, on the same images
(config.eval.warmup, timing_iters, timing_rounds; lvtp_jax.measure.speed).
"""

from typing import Any, Callable, Dict, Optional

import jax
import ml_collections

from lvtp_jax.measure import flops
from lvtp_jax.measure import speed


class Unpruned:
  """The unpruned forward of a sweep, compiled once: what the speed-up and
  the realized-FLOP ratio of every pruned row are measured against.

  Attributes:
    apply: jit (params, images) -> the model's output; its XLA FLOPs
      (`realized`) are the reference.
    timed: the forward that is timed: `apply`, or the model called with
      `timed_kwargs` (the Segmenter's label map: labels=True).
  """

  def __init__(self, model: Any, **timed_kwargs: Any):
    self.apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
    self.timed = self.apply
    if timed_kwargs:
      self.timed = jax.jit(lambda p, x: model.apply({'params': p}, x,
                                                    **timed_kwargs))
    self._realized = {}

  def realized(self, params: Any, images: jax.Array) -> float:
    """XLA GFLOPs per image of `apply` on images [B, H, W, 3] (counted
    once per shape)."""
    if images.shape not in self._realized:
      self._realized[images.shape] = flops.realized_gflops(
          self.apply, params, images, batch_size=images.shape[0])
    return self._realized[images.shape]


def measure(eval_config: ml_collections.ConfigDict, apply: Callable,
            timed: Callable, params: Any, images: jax.Array,
            unpruned: Optional[Unpruned] = None) -> Dict[str, float]:
  """GFLOPs and throughput of one setting on one batch.

  Args:
    eval_config: config.eval (warmup, timing_iters, timing_rounds).
    apply: jitted (params, images) -> output whose XLA FLOPs are counted.
    timed: the jitted forward that is timed (may be `apply`).
    params: the parameters.
    images: [B, H, W, 3], the batch both are measured on.
    unpruned: the sweep's unpruned forward; None for a setting without a
      pruning spec (nothing to compare with).

  Returns:
    dict(gflops_realized (XLA, per image), images_per_second (of `timed`,
    per batch row); with `unpruned` also speedup (images/s over the
    unpruned forward's) and realized_ratio (unpruned / this setting's XLA
    FLOPs: the speed-up the compiled program allows)).
  """
  batch = images.shape[0]
  realized = flops.realized_gflops(apply, params, images, batch_size=batch)
  fns = dict(model=timed)
  if unpruned is not None:
    fns['unpruned'] = unpruned.timed
  ips = speed.compare_images_per_second(
      fns, params, images, batch_size=batch, warmup=eval_config.warmup,
      iters=eval_config.timing_iters, rounds=eval_config.timing_rounds)
  out = dict(gflops_realized=realized, images_per_second=ips['model'])
  if unpruned is not None:
    out.update(speedup=ips['model'] / ips['unpruned'],
               realized_ratio=unpruned.realized(params, images) / realized)
  return out
