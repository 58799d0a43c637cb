r"""The accelerator suite: one prepared run that fills the README's GPU table.

  python -m lvtp_jax.bench.suite --out DIR          # one GPU/TPU, <= 8 min
  python -m lvtp_jax.bench.suite --out DIR --tiny   # CPU-sized (CI runs it)

No dataset and no download: random weights (timm models created with
pretrained=False and converted), random inputs. Writes DIR/suite.json (every
measurement, the environment, each round's time) and DIR/suite.md (the
tables for the README), after every group, so a run stopped by a time limit
keeps what it measured. Sections (lvtp_jax/bench/settings.py says what):

  classification  DeiT-S/16 and DeiT-B/16 at 224, batch 256, float32 and
                  bfloat16: lvtp_jax unpruned and every classification
                  policy (settings.CLASSIFICATION) in buffer mode, timed
                  interleaved with timm in eager PyTorch on the same device
                  (settings.TORCH_ROWS) at the same batch and dtype; timm
                  bfloat16 is torch.autocast.
  segmentation    Segmenter ViT-S/16 and ViT-B/16 at 512 x 512, batch 32,
                  linear and mask-transformer decoders, auxiliary heads
                  after blocks 6 and 8: unpruned, DToP and LVTP-R in buffer
                  mode with given capacities (no trained model to calibrate
                  on), timed interleaved.
  training        one training step (forward, backward, SGD update) of
                  Segmenter ViT-B/16 at 512, batch 8, mask transformer: the
                  official recipe's shapes, float32 and bfloat16 interleaved.

Every timing is the median of interleaved rounds after warm-up, with
`block_until_ready` (PyTorch: `torch.cuda.synchronize`). Reported per row:
images/s, ms per batch, XLA-counted GFLOPs per image (realized), analytic
GFLOPs per image (2 x MACs of matmuls at the buffer sizes: the model
FLOPs), speed-up over the unpruned row of its group and the realized-FLOP
ratio, lvtp_jax over timm eager, compile seconds, and MFU (model FLOPs x
images/s over the device's datasheet peak, settings.PEAK_TFLOPS; training
counts 3x the forward) where the peak of the device is known.

float32 matmuls: on GPUs both frameworks are set to TF32 (--fp32-matmul
tf32, JAX's default there; PyTorch's default is full float32) or both to
full float32 (--fp32-matmul highest), so that ours-vs-theirs compares the
same math; the tables say which. On the CPU nothing is changed.

Before the real sizes, a smoke test runs every measured function once on
tiny models (settings.TINY), so that an incompatibility with the device's
JAX, flax or torch fails in seconds with a clear message instead of eating
the device time. --budget-s (default 420 s, counted from the command's
start, the smoke test included) skips the groups that would start after
it, naming them; the group running at that moment finishes, so a full run
ends within about 8 minutes.

On the lent H200 (jax 0.11.2, no ml_collections there; its wheel travels in
.whl, docs/benchmarks.md "GPU and TPU"):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site \
      .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 \
      python3 -m lvtp_jax.bench.suite --out $OUT
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

from lvtp_jax.bench import environment
from lvtp_jax.bench import report
from lvtp_jax.bench import runner
from lvtp_jax.bench import settings


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.bench.suite',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True,
                      help='directory for suite.json and suite.md')
  parser.add_argument('--tiny', action='store_true',
                      help='CPU-sized models and shapes (settings.TINY)')
  parser.add_argument('--fp32-matmul', choices=('tf32', 'highest'),
                      default='tf32', help='float32 matmul math on GPUs, '
                      'for both frameworks (default tf32)')
  parser.add_argument('--budget-s', type=float, default=None,
                      help='skip groups that would start after this many '
                      'seconds from the start (default 420 for the full '
                      'run, none with --tiny)')
  parser.add_argument('--no-smoke', action='store_true',
                      help='skip the tiny smoke test of the full run')
  parser.add_argument('--sections', default=','.join(runner.SECTIONS),
                      help='comma-separated sections to run (default: all, '
                      'in this order: %(default)s); a GPU session whose '
                      'time ran out can fill in the rest with a second run')
  parser.add_argument('--no-torch', action='store_true',
                      help='leave out the PyTorch rows')
  args = parser.parse_args(argv)
  sections = tuple(s.strip() for s in args.sections.split(',') if s.strip())
  unknown = sorted(set(sections) - set(runner.SECTIONS))
  if unknown or not sections:
    parser.error(f'--sections {args.sections!r}: unknown {unknown}; choose '
                 f'from {",".join(runner.SECTIONS)}')
  # Leave the GPU memory PyTorch needs for its rows (JAX takes 75% by
  # default at its first use, which comes later).
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.6')
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  def log(message: str) -> None:
    print(f'[{time.perf_counter() - start:6.1f} s] {message}', flush=True)

  torch_rows = not args.no_torch and environment.has_torch()
  env = environment.describe(
      'python -m lvtp_jax.bench.suite ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      args.fp32_matmul, torch_rows, 'tiny' if args.tiny else 'full')
  log(f'{env["device"]} ({env["device_kind"]}), host {env["host_cpu"]}, jax '
      f'{env["versions"]["jax"]}, torch {env["versions"]["torch"]}')

  if not args.tiny and not args.no_smoke:
    log('smoke test: every measured function once, on tiny models')
    smoke = runner.Suite(
        dataclasses.replace(settings.TINY, warmup=0, iters=1, rounds=1),
        math=env['math'], peaks=env['peaks'], budget_s=None,
        torch_rows=torch_rows, log=lambda m: log('  smoke ' + m))
    try:
      runner.run_sections(smoke, sections)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      log('SMOKE TEST FAILED: the full run would fail the same way; see the '
          'traceback above (the JAX/flax/torch versions are in the first '
          'line).')
      return 3
    log(f'smoke test passed in {smoke.elapsed():.1f} s')

  sizes = settings.TINY if args.tiny else settings.FULL
  budget = args.budget_s if args.budget_s is not None else (
      None if args.tiny else 420.0)
  if budget is not None:  # what is left of it after the smoke test
    budget = max(budget - (time.perf_counter() - start), 0.0)
  suite = runner.Suite(sizes, math=env['math'], peaks=env['peaks'],
                       budget_s=budget, torch_rows=torch_rows, log=log)

  def write() -> None:
    result = dict(env, rows=suite.rows, skipped=suite.skipped,
                  elapsed_s=time.perf_counter() - start)
    with open(os.path.join(args.out, 'suite.json'), 'w') as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, 'suite.md'), 'w') as f:
      f.write(report.markdown(result))

  suite.on_group = write
  runner.run_sections(suite, sections)
  write()
  log(f'done: {os.path.join(args.out, "suite.md")}')
  print(report.markdown(dict(env, rows=suite.rows, skipped=suite.skipped,
                             elapsed_s=time.perf_counter() - start)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
