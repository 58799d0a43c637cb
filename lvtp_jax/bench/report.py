"""suite.json -> suite.md: the accelerator suite's tables, ready for the README."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Column = Tuple[str, Callable[[Dict[str, Any]], Any]]


def _num(value: Optional[float], digits: int = 1, suffix: str = '') -> str:
  if value is None or value != value:  # None or NaN
    return '-'
  return f'{value:,.{digits}f}{suffix}'


def _gflops(value: Optional[float]) -> str:
  """Four significant digits (a 2 x 64 px Segmenter and a DeiT-B alike)."""
  return '-' if value is None else f'{value:.4g}'


def _table(rows: Sequence[Dict[str, Any]], columns: List[Column]) -> str:
  lines = ['| ' + ' | '.join(name for name, _ in columns) + ' |',
           '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(str(get(row)) for _, get in columns) +
                 ' |')
  return '\n'.join(lines)


def _dtype(row: Dict[str, Any]) -> str:
  if row['math'] == row['dtype']:
    return row['dtype']
  return f'{row["dtype"]} ({row["math"]} matmuls)'


def _mfu(row: Dict[str, Any]) -> str:
  return _num(None if row.get('mfu') is None else 100 * row['mfu'], 1, '%')


_SPEED: List[Column] = [
    ('img/s', lambda r: _num(r['images_per_second'])),
    ('ms / batch', lambda r: _num(r['ms_per_batch'], 2)),
]
_FLOPS: List[Column] = [
    ('GFLOPs/img XLA', lambda r: _gflops(r.get('gflops_realized'))),
    ('GFLOPs/img model', lambda r: _gflops(r.get('gflops_analytic'))),
]
_RATIOS: List[Column] = [
    ('speed-up', lambda r: _num(r.get('speedup'), 2, 'x')),
    ('realized-FLOP ratio', lambda r: _num(r.get('realized_flop_ratio'), 2,
                                           'x')),
    ('model-FLOP ratio', lambda r: _num(r.get('model_flop_ratio'), 2, 'x')),
]
_TAIL: List[Column] = [
    ('MFU', _mfu),
    ('compile s', lambda r: _num(r.get('compile_s'), 1)),
]


def markdown(result: Dict[str, Any]) -> str:
  """The suite's tables with the command, device, versions and notes."""
  v = result['versions']
  rows = result['rows']
  peaks = result.get('peaks')
  lines = [
      f'Accelerator suite on {result["device_kind"]} ({result["device"]}; '
      f'host {result["host_cpu"]}, {result["host_cores"]} cores), '
      f'{result["date"]}, commit {result.get("commit") or "?"}:',
      '',
      f'    {result["command"]}',
      '',
      f'jax {v["jax"]}, flax {v["flax"]}, torch {v["torch"]}, timm '
      f'{v["timm"]}; random weights and inputs; medians of interleaved '
      'rounds after warm-up. GFLOPs = 2 x multiply-accumulates; XLA: '
      "counted by XLA's cost analysis of the compiled program; model: "
      'matmuls at the buffer sizes (the MFU numerator). float32 rows: '
      f'{result["fp32_matmul"]} matmuls in both frameworks. MFU: '
      + (f'against the datasheet dense peak {peaks} TFLOP/s.' if peaks else
         'no peak known for this device.'),
      '',
  ]
  if result.get('backend') not in (None, 'cpu'):
    lines += [
        f'On {result["backend"]}, XLA\'s cost analysis does not count the '
        'matmuls XLA hands to vendor libraries (cuBLAS, cuDNN), so the XLA '
        'GFLOPs and the realized-FLOP ratio built on them undercount the '
        'work (compare the model column); read the model-FLOP ratio as the '
        'cost ratio there. On the CPU the two agree to a few percent.', '']
  cls = [r for r in rows if r['section'] == 'classification']
  if cls:
    lines += ['Classification (DeiT, timm weights layout; policies in buffer '
              'mode; vs timm: lvtp_jax img/s over timm eager PyTorch at the '
              'same batch and dtype, timed interleaved):', '',
              _table(cls, [('model', lambda r: r['model']),
                           ('batch', lambda r: r['batch']),
                           ('dtype', _dtype),
                           ('row', lambda r: r['setting'])] + _SPEED +
                     _FLOPS + _RATIOS +
                     [('vs timm', lambda r: _num(r.get('vs_timm'), 2, 'x'))]
                     + _TAIL), '']
  seg = [r for r in rows if r['section'] == 'segmentation']
  if seg:
    aux = ' and '.join(str(k) for k in seg[0]['aux_layers'])
    lines += ['Segmentation (Segmenter, random weights, auxiliary heads '
              f'after blocks {aux}; DToP and LVTP-R in buffer mode with '
              'the capacities given: there is no trained model to calibrate '
              'them on, and the buffer shapes, not the decisions, set the '
              'cost; decisions: the policy\'s own XLA-counted GFLOPs):', '',
              _table(seg, [('model', lambda r: r['model']),
                           ('decoder', lambda r: r['decoder']),
                           ('batch', lambda r: r['batch']),
                           ('dtype', _dtype),
                           ('row', lambda r: r['setting']),
                           ('capacities', lambda r: ', '.join(
                               f'{c:g}' for c in r.get('capacities', []))
                            or '-')] + _SPEED + _FLOPS +
                     [('decisions', lambda r: _gflops(
                         r.get('gflops_decisions')))] + _RATIOS + _TAIL),
              '']
  train = [r for r in rows if r['section'] == 'training']
  if train:
    lines += ['Training step (forward, backward, SGD update; no input '
              'pipeline; MFU counts 3x the forward\'s model FLOPs):', '',
              _table(train, [('model', lambda r: r['model']),
                             ('decoder', lambda r: r['decoder']),
                             ('batch', lambda r: r['batch']),
                             ('dtype', _dtype),
                             ('steps/s', lambda r: _num(
                                 1e3 / r['ms_per_batch'], 2))] + _SPEED +
                     [('GFLOPs/img model (fwd)', lambda r: _gflops(
                         r['gflops_analytic']))] + _TAIL), '']
  if result.get('skipped'):
    lines += ['Not run (time budget spent): ' + '; '.join(result['skipped']),
              '']
  lines.append(f'Whole run: {result["elapsed_s"]:.0f} s.')
  return '\n'.join(lines) + '\n'
