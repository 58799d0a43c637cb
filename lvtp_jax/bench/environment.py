"""The environment a suite run records, and the float32 matmul math it sets."""

import datetime
import os
import platform
import subprocess
from typing import Any, Dict, Optional

import jax

from lvtp_jax.bench import settings
from lvtp_jax.bench import timm_compare
from lvtp_jax.measure import speed

GPU_BACKENDS = ('gpu', 'cuda', 'rocm')


def matmul_math(fp32_matmul: str, backend: str) -> Dict[str, str]:
  """dtype -> the math its matmuls run in on this backend."""
  if backend in GPU_BACKENDS:
    return {'float32': 'tf32' if fp32_matmul == 'tf32' else 'float32',
            'bfloat16': 'bfloat16'}
  return {'float32': 'float32', 'bfloat16': 'bfloat16'}


def set_fp32_matmul(fp32_matmul: str, backend: str) -> None:
  """Sets JAX's and PyTorch's float32 matmul math alike on GPUs."""
  if backend not in GPU_BACKENDS:
    return
  jax.config.update('jax_default_matmul_precision',
                    'tensorfloat32' if fp32_matmul == 'tf32' else 'highest')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_float32_matmul_precision('high' if fp32_matmul == 'tf32'
                                     else 'highest')


def peaks(device_kind: str) -> Optional[Dict[str, float]]:
  for key, peaks in settings.PEAK_TFLOPS.items():
    if key in device_kind:
      return dict(peaks)
  return None


def _host_cpu() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _versions() -> Dict[str, Optional[str]]:
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'timm'):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = None
  return out


def _commit() -> Optional[str]:
  try:
    return subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
        text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def has_torch() -> bool:
  try:
    import timm  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def describe(command: str, fp32_matmul: str, torch_rows: bool, sizes: str
             ) -> Dict[str, Any]:
  """What a suite result records about where and how it ran; also sets the
  float32 matmul math of both frameworks (set_fp32_matmul)."""
  backend = jax.default_backend()
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', device.platform)
  set_fp32_matmul(fp32_matmul, backend)
  math = matmul_math(fp32_matmul, backend)
  return dict(
      command=command,
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      device=speed.device_name(), device_kind=kind, backend=backend,
      host_cpu=_host_cpu(), host_cores=os.cpu_count(), versions=_versions(),
      commit=_commit(), math=math, fp32_matmul=math['float32'],
      peaks=peaks(kind),
      torch_device=timm_compare.torch_device() if torch_rows else None,
      sizes=sizes)
