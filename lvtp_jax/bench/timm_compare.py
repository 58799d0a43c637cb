"""lvtp_jax against timm: the same weights, the same inputs, one device.

The timm model is created with pretrained=False and converted with
`from_timm`, so both sides hold the same (random) weights; the outputs are
checked to agree before anything is timed (a timing of two different
computations would mean nothing). Used by `python -m lvtp_jax.bench` (one
model on the CPU) and by the accelerator suite (lvtp_jax.bench.suite).
"""

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax import models
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.measure import speed


def reference_pair(model_name: str, img_size: int, seed: int = 0
                   ) -> Tuple[Any, Any, Any]:
  """(timm module in eval mode, lvtp_jax ViT, its params), equal weights."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  ref = timm.create_model(model_name, pretrained=False, img_size=img_size)
  ref.eval()
  model, params = timm_convert.from_timm(model_name, ref.state_dict(),
                                         img_size=img_size)
  return ref, model, params


def torch_device() -> str:
  """'cuda' when PyTorch sees a GPU, else 'cpu'."""
  import torch  # pylint: disable=g-import-not-at-top
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def torch_forward(module: Any, images: np.ndarray, dtype: str
                  ) -> Tuple[Callable[[], Any], Callable[[], np.ndarray]]:
  """(timed call, logits) of a timm module in eager PyTorch.

  Args:
    module: a torch module (moved to the GPU when there is one).
    images: [B, H, W, 3] float32 NHWC (converted to NCHW once, here).
    dtype: 'float32', or 'bfloat16' for torch.autocast (PyTorch's mixed
      precision: float32 weights, bfloat16 matmuls, float32 softmax and
      LayerNorm), the counterpart of config.model.dtype='bfloat16'.

  Returns:
    call() runs one forward under inference_mode and waits for the device;
    logits() returns the float32 logits as NumPy.
  """
  import torch  # pylint: disable=g-import-not-at-top
  models.compute_dtype(dtype)  # validates the name
  device = torch_device()
  module = module.to(device)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  x = x.to(device)

  def forward():
    with torch.inference_mode(), torch.autocast(
        device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      return module(x)

  def call():
    forward()
    if device == 'cuda':
      torch.cuda.synchronize()

  return call, lambda: forward().float().cpu().numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """||ours - reference|| / ||reference|| (Frobenius)."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  return float(np.linalg.norm(ours - reference) /
               max(np.linalg.norm(reference), 1e-30))


def run(model_name: str, batch: int, img_size: int, warmup: int, iters: int,
        rounds: int, seed: int = 0) -> Dict[str, object]:
  """Times both implementations in float32; returns the measurements."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  ref, model, params = reference_pair(model_name, img_size, seed)
  x = np.random.default_rng(seed).standard_normal(
      (batch, img_size, img_size, 3)).astype(np.float32)
  x_jax = jax.device_put(jnp.asarray(x))
  fwd = jax.jit(lambda p, im: model.apply({'params': p}, im))
  torch_call, torch_logits = torch_forward(ref, x, 'float32')
  ref_logits = torch_logits()
  ours = np.asarray(fwd(params, x_jax))
  max_diff = float(np.abs(ours - ref_logits).max())
  scale = float(np.abs(ref_logits).max())
  if max_diff > 1e-3 * max(scale, 1.0):
    raise RuntimeError(f'outputs disagree (max |diff| {max_diff:.3g}); the '
                       'timing would compare different computations.')
  times = speed.time_interleaved(
      dict(jax=lambda: fwd(params, x_jax).block_until_ready(),
           torch=torch_call), warmup=warmup, iters=iters, rounds=rounds)
  jax_s = float(np.median(times['jax']))
  torch_s = float(np.median(times['torch']))
  return dict(
      model=model_name, batch=batch, img_size=img_size,
      device=speed.device_name(), torch_threads=torch.get_num_threads(),
      versions=dict(jax=jax.__version__, torch=torch.__version__,
                    timm=timm.__version__),
      max_abs_logit_diff=max_diff,
      lvtp_jax_images_per_second=batch / jax_s,
      timm_images_per_second=batch / torch_s,
      speed_ratio=torch_s / jax_s)
