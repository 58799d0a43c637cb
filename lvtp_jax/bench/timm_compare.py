"""Forward-pass speed of lvtp_jax against timm, on the same device and inputs.

  python -m lvtp_jax.bench --model deit_small_patch16_224 --batch 8

Both models hold the same (random) weights: the timm model is created with
pretrained=False and converted with `from_timm`, and the logits are checked to
agree before anything is timed. Each side is warmed up, then timed in
interleaved rounds (so a slow phase of the machine hits both alike) with
`block_until_ready` on the JAX side and eager PyTorch under inference_mode on
the other. The result is a ratio measured inside one run (DESIGN §7).
"""

import argparse
import json
import sys
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.measure import speed


def run(model_name: str, batch: int, img_size: int, warmup: int, iters: int,
        rounds: int, seed: int = 0) -> Dict[str, object]:
  """Times both implementations; returns a dict of the measurements."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  ref = timm.create_model(model_name, pretrained=False, img_size=img_size)
  ref.eval()
  model, params = timm_convert.from_timm(model_name, ref.state_dict(),
                                         img_size=img_size)
  x = np.random.default_rng(seed).standard_normal(
      (batch, img_size, img_size, 3)).astype(np.float32)
  x_jax = jax.device_put(jnp.asarray(x))
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  fwd = jax.jit(lambda p, im: model.apply({'params': p}, im))

  def jax_step():
    fwd(params, x_jax).block_until_ready()

  def torch_step():
    with torch.inference_mode():
      ref(x_torch)

  with torch.inference_mode():
    ref_logits = ref(x_torch).numpy()
  ours = np.asarray(fwd(params, x_jax))
  max_diff = float(np.abs(ours - ref_logits).max())
  scale = float(np.abs(ref_logits).max())
  if max_diff > 1e-3 * max(scale, 1.0):
    raise RuntimeError(f'outputs disagree (max |diff| {max_diff:.3g}); the '
                       'timing would compare different computations.')

  for _ in range(warmup):
    jax_step()
    torch_step()
  t_jax: List[float] = []
  t_torch: List[float] = []
  for _ in range(rounds):
    t_jax.append(speed.seconds_per_call(jax_step, iters))
    t_torch.append(speed.seconds_per_call(torch_step, iters))
  jax_s = float(np.median(t_jax))
  torch_s = float(np.median(t_torch))
  return dict(
      model=model_name, batch=batch, img_size=img_size,
      device=speed.device_name(), torch_threads=torch.get_num_threads(),
      versions=dict(jax=jax.__version__, torch=torch.__version__,
                    timm=timm.__version__),
      max_abs_logit_diff=max_diff,
      lvtp_jax_images_per_second=batch / jax_s,
      timm_images_per_second=batch / torch_s,
      speed_ratio=torch_s / jax_s)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.bench',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='deit_small_patch16_224')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--img-size', type=int, default=224)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=5,
                      help='forward calls per timed round')
  parser.add_argument('--rounds', type=int, default=5,
                      help='interleaved rounds; the median is reported')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  res = run(args.model, args.batch, args.img_size, args.warmup, args.iters,
            args.rounds)
  print(f'{res["model"]}  batch {res["batch"]}  {res["img_size"]}px  on '
        f'{res["device"]}')
  print(f'  lvtp_jax (jit)      {res["lvtp_jax_images_per_second"]:8.1f} img/s')
  print(f'  timm (eager torch)  {res["timm_images_per_second"]:8.1f} img/s  '
        f'({res["torch_threads"]} threads)')
  print(f'  speed ratio lvtp_jax / timm = {res["speed_ratio"]:.2f}x   '
        f'(max |logit diff| {res["max_abs_logit_diff"]:.1e})')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
