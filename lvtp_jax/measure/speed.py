"""Wall-clock throughput, measured after warm-up with block_until_ready."""

import platform
import time
from typing import Any, Callable, Dict, List

import jax
import numpy as np


def device_name() -> str:
  """A readable description of the default JAX device and the host."""
  dev = jax.devices()[0]
  kind = getattr(dev, 'device_kind', dev.platform)
  return (f'{dev.platform}:{kind} ({platform.machine()}, '
          f'{len(jax.devices())} device(s))')


def seconds_per_call(fn: Callable[[], object], iters: int) -> float:
  """Mean seconds of `fn()`; `fn` must block until its result is ready."""
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def images_per_second(fn: Callable, *args, batch_size: int, warmup: int = 2,
                      iters: int = 5, rounds: int = 3) -> float:
  """Throughput of `fn(*args)` on a batch: the median of `rounds` rounds."""
  call = lambda: jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    call()
  times = [seconds_per_call(call, iters) for _ in range(rounds)]
  return batch_size / float(np.median(times))


def time_interleaved(calls: Dict[str, Callable[[], Any]], *, warmup: int = 2,
                     iters: int = 5, rounds: int = 3) -> Dict[str, List[float]]:
  """Seconds per call of several zero-argument calls, timed interleaved.

  Every call must block until its work is done (`jax.block_until_ready`,
  `torch.cuda.synchronize`). Each is warmed up `warmup` times, then every
  round times each call for `iters` calls in turn, so that slow drifts of
  the machine (clock frequency, other load) hit all of them alike.

  Returns:
    name -> [rounds] mean seconds per call in each round.
  """
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      times[name].append(seconds_per_call(call, iters))
  return times


def compare_images_per_second(fns: Dict[str, Callable], *args, batch_size: int,
                              warmup: int = 2, iters: int = 5,
                              rounds: int = 3) -> Dict[str, float]:
  """Throughput of several `fn(*args)` timed in interleaved rounds.

  The median round of each is reported (`time_interleaved`). Ratios of the
  results are the speed-ups measured inside one run (DESIGN §7).
  """
  calls = {name: (lambda f=f: jax.block_until_ready(f(*args)))
           for name, f in fns.items()}
  times = time_interleaved(calls, warmup=warmup, iters=iters, rounds=rounds)
  return {name: batch_size / float(np.median(t)) for name, t in times.items()}
