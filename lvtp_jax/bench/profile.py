"""Where the time of a forward goes: per-operation profiles of both sides.

`jax_op_profile` traces a jitted call with jax.profiler and sums the time
of every executed HLO instruction by the source operation it came from (the
`op_name` XLA keeps in its metadata, block indices folded, so the 12 qkv
matmuls of a ViT are one line). `torch_op_profile` does the same for eager
PyTorch with torch.profiler (self CPU time per aten operator). Both are what
`python -m lvtp_jax.bench --profile` prints, so the reason for a speed ratio
can be read off on whichever CPU a session gets. On XLA:CPU the executed
instructions are the thunks (fusions, YNNPACK/oneDNN calls); on GPUs the
trace names kernels instead, which this grouping does not map (use
`jax.profiler` with TensorBoard or Perfetto there).
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import jax

# (operation, milliseconds per call, instructions per call)
Profile = List[Tuple[str, float, float]]


def _op_names(hlo_text: str) -> Dict[str, str]:
  """HLO instruction name -> its op_name metadata, jit prefix and block
  index removed ('ViT/ViT.run_block/blocks_N/mlp/fc1/dot_general')."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]+)"', line)
    if m:
      op = m.group(2).split(')/', 1)[-1]
      names[m.group(1)] = re.sub(r'blocks_\d+', 'blocks_N', op)
  return names


def jax_op_profile(fn: Callable, *args, calls: int = 3) -> Profile:
  """Per-operation time of `jax.jit(fn)(*args)`, heaviest first.

  The call is compiled and warmed up first; `calls` calls are traced and
  the instruction times averaged over them.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  names = _op_names(compiled.as_text())
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    files = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                      recursive=True)
    if not files:
      raise RuntimeError('jax.profiler wrote no Perfetto trace.')
    with gzip.open(files[0]) as f:
      events = json.load(f)['traceEvents']
  total = collections.defaultdict(float)
  count = collections.Counter()
  for event in events:
    op = names.get(event.get('name'))
    if event.get('ph') == 'X' and op is not None:
      total[op] += event['dur'] / 1e3
      count[op] += 1
  return sorted(((op, ms / calls, count[op] / calls)
                 for op, ms in total.items()), key=lambda r: -r[1])


def torch_op_profile(call: Callable[[], Any], calls: int = 3) -> Profile:
  """Per-operator self CPU time of `call()` (eager PyTorch), heaviest first."""
  import torch  # pylint: disable=g-import-not-at-top
  for _ in range(2):
    call()
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      call()
  rows = [(e.key, e.self_cpu_time_total / 1e3 / calls, e.count / calls)
          for e in prof.key_averages()]
  return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])


# Operations of a ViT block itself; what else runs inside a block is an
# in-block reduction's own work (scoring, sorting, gathers, merges).
_BLOCK_OPS = re.compile(r'blocks_N/(attn|mlp|norm1|norm2|ls1|ls2)/|'
                        r'blocks_N/add$')


def reduction_ms(rows: Profile) -> float:
  """Milliseconds of the operations inside encoder blocks that are not the
  block's own (attention, MLP, norms, residual adds), plus the policy's
  per-image set-up (GTP's graph, under the 'policy_init' scope): the work
  an in-block reduction adds (its signals, e.g. the CLS attention row,
  count as the attention's)."""
  return sum(ms for op, ms, _ in rows
             if ('blocks_N/' in op and not _BLOCK_OPS.search(op))
             or 'policy_init/' in op)


def format_profile(title: str, rows: Profile, wall_ms: float,
                   top: int = 15) -> str:
  """The `top` heaviest operations with their share of `wall_ms`."""
  lines = [f'{title}: {wall_ms:.1f} ms per call (wall); per operation, '
           'summed over its instructions:']
  for op, ms, n in rows[:top]:
    lines.append(f'  {ms:8.2f} ms {100 * ms / wall_ms:5.1f}%  x{n:<4.0f} {op}')
  rest = sum(ms for _, ms, _ in rows[top:])
  lines.append(f'  {rest:8.2f} ms {100 * rest / wall_ms:5.1f}%        '
               f'{max(len(rows) - top, 0)} other operations')
  return '\n'.join(lines)
