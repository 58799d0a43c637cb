r"""lvtp_jax's EViT, ToMe and GTP against their official PyTorch code, same
device.

  git clone https://github.com/facebookresearch/ToMe /tmp/ToMe
  git clone https://github.com/youweiliang/evit /tmp/evit
  git clone https://github.com/Ackesnal/GTP-ViT /tmp/GTP-ViT
  python -m lvtp_jax.bench.official --tome /tmp/ToMe --evit /tmp/evit \
      --gtp /tmp/GTP-ViT

The official repositories are not dependencies of lvtp_jax and nothing of
them is copied here: they are imported from the checkouts given, at run
time. EViT's helpers.py imports torchprofile for its FLOP counter only; when
torchprofile is not installed, an empty stand-in module is put in its place
(the forward never calls it). Importing evit.py re-registers timm's deit_*
model names, so every timm model is created before it is imported, and the
EViT model is built from its class (its factory functions predate timm 1.0).

Rows (DeiT-S/16 at 224, float32, the same random weights everywhere):
timm eager unpruned, the official ToMe (tome.patch.timm, model.r = r) and
the official EViT (evit.EViT, keep rate at blocks 4/7/10, fused token),
with --gtp the official GTP-ViT (models_v3.py, README settings, see
official_gtp), and lvtp_jax unpruned, ToMe, EViT (and GTP) in buffer mode. Before timing, each
lvtp_jax model's logits are checked against its official counterpart
(1e-4 x max |logits|). All rows are timed interleaved in one process, after
warm-up (JAX: block_until_ready; PyTorch: eager under inference_mode,
torch.cuda.synchronize on a GPU); the ratios ours / official are measured
inside one run (DESIGN §7).
"""

import argparse
import json
import os
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np

from lvtp_jax import pruning
from lvtp_jax.bench import timm_compare
from lvtp_jax.measure import speed

MODEL = 'deit_small_patch16_224'


def _import_from(path: str, module: str):
  """Imports `module` from the checkout at `path` (a clear error if not)."""
  if not os.path.isdir(path):
    raise SystemExit(f'{path} is not a directory; give the path of a '
                     f'checkout of the official repository ({module}).')
  sys.path.insert(0, os.path.abspath(path))
  try:
    return __import__(module)
  except ImportError as e:
    raise SystemExit(f'cannot import {module!r} from {path}: {e}') from None


def official_tome(tome_path: str, timm_model, r: int):
  """The timm model patched by the official ToMe (tome.patch.timm)."""
  tome = _import_from(tome_path, 'tome')
  tome.patch.timm(timm_model)
  timm_model.r = r
  return timm_model


def official_evit(evit_path: str, keep_rate: float, state_dict):
  """The official EViT DeiT-S (evit.EViT) holding `state_dict`."""
  try:
    import torchprofile  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.modules['torchprofile'] = types.ModuleType('torchprofile')
    sys.modules['torchprofile'].profile_macs = None
  evit = _import_from(evit_path, 'evit')
  keep = [1.0] * 12
  for block in (3, 6, 9):   # the official drop_loc
    keep[block] = keep_rate
  model = evit.EViT(embed_dim=384, depth=12, num_heads=6, keep_rate=keep,
                    fuse_token=True).eval()
  model.load_state_dict(state_dict)
  return model


def official_gtp(gtp_path: str, num_prop: int, state_dict):
  """The official GTP-ViT DeiT-S (models_v3.py) holding `state_dict`, as
  its README runs it (MixedAttnMax, GraphProp, Mixed graph, 8 neighbours,
  alpha 0.1, sparsity 1, no token scales).

  Two run-time shims, nothing changed in the checkout: the constructor's
  `.to("cuda")` of the spatial graph goes to the CPU when no GPU is there
  (torch.Tensor.to wrapped while the model is built), and propagate()'s
  append to a file `missing` in the working directory on every call (a
  debugging side effect of the official code) lands in a temporary
  directory (the caller runs the model there)."""
  import torch  # pylint: disable=g-import-not-at-top
  models_v3 = _import_from(gtp_path, 'models_v3')
  original = torch.Tensor.to

  def to(tensor, *args, **kwargs):
    if (not torch.cuda.is_available() and args
        and str(args[0]).startswith('cuda')):
      return tensor
    return original(tensor, *args, **kwargs)

  torch.Tensor.to = to
  try:
    model = models_v3.graph_propagation_deit_small_patch16_224(
        selection='MixedAttnMax', propagation='GraphProp', num_prop=num_prop,
        graph_type='Mixed', num_neighbours=8, alpha=0.1, sparsity=1.0,
        token_scale=False)
  finally:
    torch.Tensor.to = original
  if torch.cuda.is_available():
    model.spatial_graph = model.spatial_graph.cuda()
  model.load_state_dict(state_dict)
  return model.eval()


def run(tome_path: str, evit_path: str, *, batch: int, r: int,
        keep_rate: float, warmup: int, iters: int, rounds: int, seed: int = 0,
        gtp_path: str = None, num_prop: int = 8):
  """Times the rows (six, eight with GTP); returns the measurements."""
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  timm_ref, model, params = timm_compare.reference_pair(MODEL, 224, seed)
  state_dict = copy.deepcopy(timm_ref.state_dict())
  tome_ref = official_tome(tome_path, copy.deepcopy(timm_ref), r)
  evit_ref = official_evit(evit_path, keep_rate, state_dict)
  x = np.random.default_rng(seed).standard_normal(
      (batch, 224, 224, 3)).astype(np.float32)
  x_dev = jax.device_put(jnp.asarray(x))
  ours = {
      'lvtp_jax unpruned': model,
      f'lvtp_jax ToMe r={r}': pruning.attach(model, dict(
          name='tome', mode='buffer', tome=dict(r=r))),
      f'lvtp_jax EViT {keep_rate}': pruning.attach(model, dict(
          name='evit', mode='buffer', evit=dict(keep_rate=keep_rate))),
  }
  official = {'timm eager unpruned': timm_ref,
              f'official ToMe r={r}': tome_ref,
              f'official EViT {keep_rate}': evit_ref}
  if gtp_path:
    ours[f'lvtp_jax GTP P={num_prop}'] = pruning.attach(model, dict(
        name='gtp', mode='buffer', gtp=dict(num_prop=num_prop)))
    official[f'official GTP P={num_prop}'] = official_gtp(
        gtp_path, num_prop, state_dict)
  calls, logits = {}, {}
  for name, module in official.items():
    call, get = timm_compare.torch_forward(module, x, 'float32')
    calls[name], logits[name] = call, get()
  for name, m in ours.items():
    fwd = jax.jit(lambda p, im, m=m: m.apply({'params': p}, im))
    logits[name] = np.asarray(fwd(params, x_dev))
    calls[name] = lambda f=fwd: f(params, x_dev).block_until_ready()
  pairs = list(zip(ours, official))
  agreement = {}
  for mine, theirs in pairs:
    err = float(np.abs(logits[mine] - logits[theirs]).max())
    scale = float(np.abs(logits[theirs]).max())
    agreement[mine] = err / scale
    if err > 1e-4 * scale:
      raise RuntimeError(f'{mine} and {theirs} disagree (max |diff| '
                         f'{err:.3g}, max |logits| {scale:.3g}): the timing '
                         'would compare different computations.')
  times = speed.time_interleaved(calls, warmup=warmup, iters=iters,
                                 rounds=rounds)
  ips = {k: batch / float(np.median(v)) for k, v in times.items()}
  return dict(
      model=MODEL, batch=batch, device=speed.device_name(),
      torch_threads=torch.get_num_threads(),
      versions=dict(jax=jax.__version__, torch=torch.__version__),
      images_per_second=ips,
      relative_logit_error=agreement,
      ours_over_official={mine: ips[mine] / ips[theirs]
                          for mine, theirs in pairs},
      speedup_over_unpruned={k: v / ips[('lvtp_jax' if k.startswith(
          'lvtp_jax') else 'timm eager') + ' unpruned'] for k, v in ips.items()})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.bench.official',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--tome', required=True,
                      help='path of a checkout of facebookresearch/ToMe')
  parser.add_argument('--evit', required=True,
                      help='path of a checkout of youweiliang/evit')
  parser.add_argument('--gtp', default=None,
                      help='path of a checkout of Ackesnal/GTP-ViT (optional)')
  parser.add_argument('--num-prop', type=int, default=8,
                      help='GTP tokens propagated per block')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--r', type=int, default=13)
  parser.add_argument('--keep-rate', type=float, default=0.7)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as scratch:
    here = os.getcwd()
    os.chdir(scratch)    # the official GTP writes ./missing on every call
    try:
      res = run(os.path.join(here, args.tome), os.path.join(here, args.evit),
                batch=args.batch, r=args.r, keep_rate=args.keep_rate,
                warmup=args.warmup, iters=args.iters, rounds=args.rounds,
                gtp_path=args.gtp and os.path.join(here, args.gtp),
                num_prop=args.num_prop)
    finally:
      os.chdir(here)
  print(f'{res["model"]}, batch {res["batch"]}, float32, on {res["device"]} '
        f'(torch {res["torch_threads"]} threads)')
  for name, ips in res['images_per_second'].items():
    print(f'  {name:24s} {ips:8.1f} img/s  '
          f'{res["speedup_over_unpruned"][name]:.2f}x its unpruned')
  for name, ratio in res['ours_over_official'].items():
    print(f'  {name} / official: {ratio:.2f}x   (logits agree to '
          f'{res["relative_logit_error"][name]:.1e} x max)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
