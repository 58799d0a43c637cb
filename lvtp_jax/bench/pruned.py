r"""In-block reductions on a ViT: do they save what their FLOPs promise?

  python -m lvtp_jax.bench.pruned --model deit_small_patch16_224 --batch 8 \
      --setting evit:keep_rate=0.7 --setting evit:keep_rate=0.5 \
      --setting tome:r=8 --setting tome:r=13 --setting tome:r=16

For each setting (config.pruning.<name> fields after the colon; buffer
mode), on random weights of the timm architecture: images/s timed
interleaved with the unpruned model in one process after warm-up, the
speed-up, the realized-FLOP ratio (unpruned / pruned XLA-counted FLOPs, the
speed-up the compiled program allows) and their quotient, and the policy's
own work as a share of the forward's time, from a per-operation profile
(bench/profile.py: the operations inside the blocks that are not the
block's attention, MLP, norms or residual adds).
"""

import argparse
import ast
import json
import sys
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax import pruning
from lvtp_jax.bench import profile
from lvtp_jax.bench import runner
from lvtp_jax.measure import flops
from lvtp_jax.measure import speed


def parse_setting(text: str) -> Tuple[str, Dict[str, Any]]:
  """'tome:r=13,prop_attn=False' -> (that text, buffer-mode config.pruning)."""
  name, _, fields = text.partition(':')
  block = {}
  for item in filter(None, fields.split(',')):
    key, eq, value = item.partition('=')
    if not eq:
      raise ValueError(f'--setting {text!r}: expected NAME:field=value,...')
    try:
      block[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      block[key] = value
  cfg = dict(name=name, mode='buffer')
  if block:
    cfg[name] = block
  return text, cfg


def run(model_name: str, img_size: int, batch: int,
        settings: List[Tuple[str, Dict[str, Any]]], *, warmup: int,
        iters: int, rounds: int, seed: int = 0) -> List[Dict[str, Any]]:
  """One row per setting (and the unpruned one first)."""
  rng = np.random.default_rng(seed)
  model, params = runner.random_vit(model_name, img_size, rng)
  params = jax.device_put(params)
  x = jax.device_put(jnp.asarray(rng.standard_normal(
      (batch, img_size, img_size, 3)).astype(np.float32)))
  models = {'unpruned': model}
  for name, cfg in settings:
    models[name] = pruning.attach(model, cfg)
  fns, realized = {}, {}
  for name, m in models.items():
    fn = lambda p, im, m=m: m.apply({'params': p}, im)
    fns[name] = jax.jit(fn)
    realized[name] = flops.xla_flops(fn, params, x) / batch / 1e9
  ips = speed.compare_images_per_second(fns, params, x, batch_size=batch,
                                        warmup=warmup, iters=iters,
                                        rounds=rounds)
  rows = []
  for name, m in models.items():
    ops = profile.jax_op_profile(
        lambda p, im, m=m: m.apply({'params': p}, im), params, x)
    wall = sum(ms for _, ms, _ in ops)
    speedup = ips[name] / ips['unpruned']
    ratio = realized['unpruned'] / realized[name]
    rows.append(dict(
        setting=name, images_per_second=ips[name], speedup=speedup,
        realized_flop_ratio=ratio, speedup_over_ratio=speedup / ratio,
        gflops_realized=realized[name],
        reduction_ms=profile.reduction_ms(ops), profiled_ms=wall,
        reduction_share=profile.reduction_ms(ops) / wall))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.bench.pruned',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='deit_small_patch16_224')
  parser.add_argument('--img-size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--setting', action='append', required=True,
                      help='NAME[:field=value,...], e.g. tome:r=13 '
                      '(repeat for several)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  rows = run(args.model, args.img_size, args.batch,
             [parse_setting(s) for s in args.setting], warmup=args.warmup,
             iters=args.iters, rounds=args.rounds)
  print(f'{args.model}, {args.img_size} px, batch {args.batch}, float32, on '
        f'{speed.device_name()}')
  print(f'  {"setting":24s} {"img/s":>7s} {"speed-up":>9s} {"FLOP ratio":>11s}'
        f' {"quotient":>9s} {"GFLOPs":>7s} {"policy share":>13s}')
  for r in rows:
    print(f'  {r["setting"]:24s} {r["images_per_second"]:7.1f} '
          f'{r["speedup"]:8.2f}x {r["realized_flop_ratio"]:10.2f}x '
          f'{r["speedup_over_ratio"]:9.2f} {r["gflops_realized"]:7.2f} '
          f'{100 * r["reduction_share"]:12.1f}%')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(model=args.model, batch=args.batch,
                     device=speed.device_name(), rows=rows), f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
