"""Standard evaluation sweeps (config.sweep): the policy comparison and the
LVTP ablation, as lists of dotted config overrides, one results row each.

  config.sweep = sweeps.policy_comparison()
  python eval.py --config configs/quickstart.py:sweep=lvtp_ablation ...

Every setting runs on the same checkpoint with no fine-tuning; the rows'
names are unique so that eval.py can add them to an existing results.json.
"""

from typing import Any, Dict, Tuple

Sweep = Tuple[Dict[str, Any], ...]

# Buffer mode with measured capacities: the 75th percentile of the active
# fraction after each boundary, over 200 training images; images with more
# active patches overflow and their surplus exits by the overflow rule
# (counted in every row).
BUFFER = {'pruning.mode': 'buffer', 'pruning.calibrate.images': 200,
          'pruning.calibrate.quantile': 0.75}
# The exit-map picture shows the masked-mode settings of the comparison.
_NO_MAPS = {'eval.exit_maps': 0}
# LVTP-R with DToP's per-class context rule (spec §3.3 option).
LVTP_CONTEXT = {'pruning.lvtp.keep_topk_per_class': 5}


def policy_comparison() -> Sweep:
  """The unpruned model, the random floor, DToP (p0 0.95, 0.9), LVTP-R (spec
  defaults, and with the context rule): each in masked mode (the exact
  algorithm: quality and effective GFLOPs) and in buffer mode (real savings:
  realized GFLOPs and measured speed-up)."""
  policies = [
      ('random', {'pruning.name': 'random',
                  'pruning.random.exit_fraction': (0.3,)}),
      ('dtop_p0.95', {'pruning.name': 'dtop',
                      'pruning.dtop.threshold': 0.95}),
      ('dtop_p0.9', {'pruning.name': 'dtop', 'pruning.dtop.threshold': 0.9}),
      ('lvtp', {'pruning.name': 'lvtp'}),
      ('lvtp_ctx5', dict({'pruning.name': 'lvtp'}, **LVTP_CONTEXT)),
  ]
  rows = [{'eval.name': 'unpruned'}]
  for name, setting in policies:
    rows.append(dict(setting, **{'eval.name': name}))
    rows.append(dict(setting, **BUFFER, **_NO_MAPS,
                     **{'eval.name': f'{name}/buffer'}))
  return tuple(rows)


def lvtp_ablation() -> Sweep:
  """LVTP-R's parts one at a time, in masked mode (the exact algorithm):
  single q vs several, the weightings, spatial scales, with and without the
  edge rescue, one vs two clustering passes, the clustering variants, exit
  budgets, the confidence floor, context rules and the interpolated fill."""
  variants = [
      ('q0.5', {'pruning.lvtp.qs': (0.5,), 'pruning.lvtp.weighting': 'single'}),
      ('q1', {'pruning.lvtp.qs': (1.0,), 'pruning.lvtp.weighting': 'single'}),
      ('q2', {'pruning.lvtp.qs': (2.0,), 'pruning.lvtp.weighting': 'single'}),
      ('ewm', {'pruning.lvtp.weighting': 'ewm'}),
      ('uniform', {'pruning.lvtp.weighting': 'uniform'}),
      ('spatial_1_3', {'pruning.lvtp.spatial_scales': (1, 3)}),
      ('no_edge_rescue', {'pruning.lvtp.passes': 1}),
      ('edge_k3', {'pruning.lvtp.k2': 3}),
      ('joint', {'pruning.lvtp.clustering': 'joint'}),
      ('joint_one_pass', {'pruning.lvtp.clustering': 'joint',
                          'pruning.lvtp.passes': 1}),
      ('per_class', {'pruning.lvtp.clustering': 'per_class'}),
      ('budget0.3', {'pruning.lvtp.max_exit_frac': (0.3,)}),
      ('budget0.15', {'pruning.lvtp.max_exit_frac': (0.15,)}),
      ('conf_floor0.9', {'pruning.lvtp.conf_floor': 0.9}),
      ('ctx5_no_edge_rescue', dict(LVTP_CONTEXT, **{
          'pruning.lvtp.passes': 1})),
      ('ctx5_edge_k3', dict(LVTP_CONTEXT, **{'pruning.lvtp.k2': 3})),
      ('ctx_grid2', {'pruning.lvtp.context_stride': 2}),
      ('interpolate', {'pruning.lvtp.pruned_fill': 'interpolate'}),
  ]
  return tuple(dict({'pruning.name': 'lvtp'}, **v, **_NO_MAPS,
                    **{'eval.name': f'lvtp/{name}'}) for name, v in variants)
