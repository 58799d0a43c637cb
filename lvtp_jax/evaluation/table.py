"""results.json as a Markdown table, relative to its unpruned row.

  python -m lvtp_jax.evaluation.table runs/quickstart/results.json

Columns: quality in percent and its change from the row named `unpruned`
(or the first policy-'none' row), effective GFLOPs and the cut they mean,
realized (XLA) GFLOPs, the measured speed-up over the unpruned forward in
the same process, the speed-up the realized FLOPs allow, overflow and the
policy's own share of the realized FLOPs.
"""

import argparse
import json
import sys
from typing import Any, Dict, List


def _reference(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  named = [r for r in rows if r['name'] == 'unpruned']
  none = [r for r in rows if r['policy'] == 'none']
  if not (named or none):
    raise ValueError('results.json has no unpruned row (policy none) to '
                     'compare against.')
  return (named or none)[0]


def _realized_ratio(row: Dict[str, Any]) -> float:
  # Segmentation rows before 2026-12-05 spelled it realized_flops_ratio.
  return row.get('realized_flop_ratio', row.get('realized_flops_ratio', 1.0))


def markdown(rows: List[Dict[str, Any]]) -> str:
  """The table (module docstring) of segmentation rows."""
  ref = _reference(rows)
  head = ('| setting | mode | mIoU | Δ | boundary mIoU | Δ | eff. GFLOPs | '
          'cut | realized GFLOPs | speed-up | realized ratio | overflow | '
          'policy FLOPs |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    mode = r.get('params', {}).get('mode', '-')
    cut = 100 * (1 - r['gflops_effective'] / ref['gflops_effective'])
    overflow = '-'
    if 'overflow_forwards' in r and mode == 'buffer':
      overflow = f'{r["overflow_forwards"]}/{r["forwards"]}'
    lines.append(
        f'| {r["name"]} | {mode} | {r["miou"]:.2f} | '
        f'{r["miou"] - ref["miou"]:+.2f} | {r["boundary_miou"]:.2f} | '
        f'{r["boundary_miou"] - ref["boundary_miou"]:+.2f} | '
        f'{r["gflops_effective"]:.3f} | {cut:.1f}% | '
        f'{r["gflops_realized"]:.3f} | {r.get("speedup", 1.0):.2f}x | '
        f'{_realized_ratio(r):.2f}x | {overflow} | '
        f'{100 * r.get("decision_share", 0.0):.2f}% |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results', help='a results.json written by eval.py')
  args = parser.parse_args(argv)
  with open(args.results) as f:
    out = json.load(f)
  rows = [r for r in out['rows'] if 'miou' in r]
  print(f'device: {out["device"]}')
  print(markdown(rows))


if __name__ == '__main__':
  main(sys.argv[1:])
