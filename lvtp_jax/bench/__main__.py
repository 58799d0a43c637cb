"""Forward-pass speed of lvtp_jax against timm, on the same device and inputs.

  python -m lvtp_jax.bench --model deit_small_patch16_224 --batch 8
  python -m lvtp_jax.bench --model deit_small_patch16_224 --batch 8 --profile

Both models hold the same (random) weights and the logits are checked to
agree before anything is timed (lvtp_jax/bench/timm_compare.py). Each side
is warmed up, then timed in interleaved rounds (so a slow phase of the
machine hits both alike) with `block_until_ready` on the JAX side and eager
PyTorch under inference_mode on the other; the result is a ratio measured
inside one run (DESIGN §7). --profile then prints where the time of each
side goes, per operation (lvtp_jax/bench/profile.py). The accelerator suite
is `python -m lvtp_jax.bench.suite`.
"""

import argparse
import json
import sys

import jax.numpy as jnp
import numpy as np

from lvtp_jax.bench import profile
from lvtp_jax.bench import timm_compare
from lvtp_jax.convert import timm as timm_convert


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
  parser.add_argument('--profile', action='store_true',
                      help='also print the time per operation of both sides')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  for name in ('batch', 'img_size', 'iters', 'rounds'):
    if getattr(args, name) <= 0:
      parser.error(f'--{name.replace("_", "-")} {getattr(args, name)} must be '
                   '> 0.')
  if args.warmup < 0:
    parser.error(f'--warmup {args.warmup} must be >= 0.')
  try:   # names the unsupported architecture before timm fails deep inside
    patch = timm_convert.model_config(args.model)['model']['patch_size']
  except ValueError as e:
    parser.error(f'--model {args.model}: {e}')
  if args.img_size % patch:
    parser.error(f'--img-size {args.img_size} is not a multiple of the patch '
                 f'size {patch} of {args.model}.')
  res = timm_compare.run(args.model, args.batch, args.img_size, args.warmup,
                         args.iters, args.rounds)
  print(f'{res["model"]}  batch {res["batch"]}  {res["img_size"]}px  on '
        f'{res["device"]}')
  print(f'  lvtp_jax (jit)      {res["lvtp_jax_images_per_second"]:8.1f} img/s')
  print(f'  timm (eager torch)  {res["timm_images_per_second"]:8.1f} img/s  '
        f'({res["torch_threads"]} threads)')
  print(f'  speed ratio lvtp_jax / timm = {res["speed_ratio"]:.2f}x   '
        f'(max |logit diff| {res["max_abs_logit_diff"]:.1e})')
  if args.profile:
    ref, model, params = timm_compare.reference_pair(args.model,
                                                     args.img_size)
    x = np.random.default_rng(0).standard_normal(
        (args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
    rows = profile.jax_op_profile(
        lambda p, im: model.apply({'params': p}, im), params, jnp.asarray(x))
    print(profile.format_profile(
        'lvtp_jax', rows, 1e3 * args.batch / res['lvtp_jax_images_per_second']))
    call, _ = timm_compare.torch_forward(ref, x, 'float32')
    print(profile.format_profile(
        'timm', profile.torch_op_profile(call),
        1e3 * args.batch / res['timm_images_per_second']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
