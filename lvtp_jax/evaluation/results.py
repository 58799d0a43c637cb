"""WORKDIR/results.json: {"device": ..., "rows": [...]} (DESIGN §3)."""

import json
import os
from typing import Any, Dict, List

from lvtp_jax.measure import speed

_COLUMNS = ('name', 'policy', 'top1', 'miou', 'boundary_miou',
            'gflops_realized', 'gflops_effective', 'images_per_second')


def write(workdir: str, rows: List[Dict[str, Any]],
          merge: bool = False) -> Dict[str, Any]:
  """Writes results.json atomically (a killed run leaves the old file whole).

  merge: keep the rows already in the file, replacing those with the name of
  a new row (eval.py adds an ablation's rows to a training run's).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'results.json')
  if merge and os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get('rows', [])
    new_names = {r['name'] for r in rows}
    rows = [r for r in old if r.get('name') not in new_names] + list(rows)
  out = dict(device=speed.device_name(), rows=rows)
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(path + '.tmp', path)
  return out


def format_table(rows: List[Dict[str, Any]]) -> str:
  """The rows as a plain-text table of the main columns."""
  cols = [c for c in _COLUMNS if any(c in r for r in rows)]
  fmt = lambda v: f'{v:.2f}' if isinstance(v, float) else str(v)
  table = [cols] + [[fmt(r.get(c, '')) for c in cols] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
  return '\n'.join('  '.join(v.ljust(w) for v, w in zip(line, widths))
                   for line in table)
