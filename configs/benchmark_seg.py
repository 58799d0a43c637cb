r"""Segmentation test bed: a 12-block Segmenter with 256 patch tokens.

  python train.py --config configs/benchmark_seg.py --workdir runs/benchmark_seg

The quickstart's 6-block, 64-patch model cannot rank pruning methods (a
random quarter of the patches exiting costs 0.7 mIoU). This model is
closer to the papers: 12 blocks (width 128, 4 heads, MLP 512), patch size 8
on 128 x 128 images (a 16 x 16 grid, 256 patch tokens), auxiliary heads
after blocks 6 and 8 (DToP's placement on a 12-block ViT, spec dtop.md §2),
trained from random initialisation on synthetic_scenes/hard (difficulty
2.5: more small and thin things, noise, blur, colour overlap). Re-running
resumes; --restart starts over.

The exit policies on the trained model (no fine-tuning), as on the
quickstart:

  python eval.py --config configs/benchmark_seg.py:sweep=policies \
      --workdir runs/benchmark_seg
  python -m lvtp_jax.evaluation.selection \
      --config configs/benchmark_seg.py:sweep=testbed \
      --workdir runs/benchmark_seg --cuts 0.2,0.3,0.4,0.5

arg (comma-separated):
  runlocal  a tiny model and a few steps on synthetic_scenes/tiny (tests)
  sweep     none | policies | selection | testbed (the grid the test bed
            chooses from: random, DToP and LVTP-R settings,
            lvtp_jax/evaluation/sweeps.py testbed_grid) | exits (its
            unpruned, random, DToP and LVTP-R settings only)
  scenes    hard (default) | shapes: synthetic_scenes/shapes, whose large
            disks, blobs and triangles are flat-coloured so that only
            their outline tells them apart (docs/benchmark_seg.md: on
            'hard' a linear read-out after block 2 matches the decoder) |
            snakes: synthetic_scenes/snakes, grey tubes whose class is the
            colour of a marker at one end, often many patches away |
            paths: synthetic_scenes/paths, the same with the tubes along
            the patch grid (a tube patch reaches its marker only through
            a chain of tube patches, up to 17 steps) | paths_short:
            8-14 tubes of 2-5 cells, 3300 steps in one run (59 min on 2
            CPU cores; with posemb=sincos2d, the measured model of
            docs/benchmark_seg.md) | paths_dense: 20-30 such tubes, a
            third of the cells (3200 steps)
  posemb    learn (default: a learnt position embedding, as timm and
            Segmenter) | sincos2d: fixed 2-D sine-cosines, whose dot
            products depend only on the offset between two patches
            (lvtp_jax/models/posemb.py; docs/benchmark_seg.md, 'paths'
            with sincos2d)
"""

import importlib.util
import os

from lvtp_jax import config_args
from lvtp_jax.evaluation import sweeps
from lvtp_jax.models import posemb as posemb_lib


SCENES = ('hard', 'shapes', 'snakes', 'paths', 'paths_short', 'paths_dense')


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'quickstart.py')
  spec = importlib.util.spec_from_file_location('quickstart_base', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg=None):
  arg = config_args.parse_arg(arg, runlocal=False, sweep='none',
                              scenes='hard', posemb='learn')
  if arg.scenes not in SCENES:
    raise ValueError(f'configs/benchmark_seg.py: scenes={arg.scenes!r}; '
                     f'expected one of {SCENES}.')
  if arg.posemb not in posemb_lib.KINDS:
    raise ValueError(f'configs/benchmark_seg.py: posemb={arg.posemb!r}; '
                     f'expected one of {posemb_lib.KINDS}.')
  base = _quickstart()
  testbed = arg.sweep in ('testbed', 'exits')
  config = base.get_config(f'sweep={"none" if testbed else arg.sweep}' +
                           (',runlocal' if arg.runlocal else ''))
  if testbed:
    exits = ('none', 'random', 'dtop', 'lvtp')   # sweep=exits keeps these
    config.sweep = tuple(
        s for s in sweeps.testbed_grid() if arg.sweep == 'testbed'
        or s.get('pruning.name', 'none') in exits)
  config.model.posemb = arg.posemb
  if arg.runlocal:
    config.model.patch_size = 8
    if testbed:   # one of each policy
      keep = ('unpruned', 'random0.5', 'dtop_p0.9', 'lvtp_sum')
      config.sweep = tuple(s for s in config.sweep if s['eval.name'] in keep)
    return config
  config.model.update(dict(width=128, depth=12, num_heads=4, mlp_dim=512,
                           patch_size=8, aux_layers=(6, 8)))
  config.data.name = f'synthetic_scenes/{arg.scenes}'
  # 'paths' trains 3000 steps: its chains take longer to learn (about
  # 50 min on 2 CPU cores); 'paths_short' 3300 (the late blocks start to
  # add accuracy only in the last quarter; 59 min); 'paths_dense' 3200
  # (57 min); the others keep their documented 2500.
  steps = {'paths': 3000, 'paths_short': 3300,
           'paths_dense': 3200}.get(arg.scenes, 2500)
  config.train.update(dict(num_steps=steps, warmup_steps=100, batch_size=16,
                           checkpoint_every=250, eval_every=500,
                           eval_examples=100))
  return config
