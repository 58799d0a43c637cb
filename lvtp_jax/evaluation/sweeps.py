"""Evaluation sweeps (config.sweep) and `settings`, which expands one.

The standard sweeps: the segmentation policy comparison, the LVTP ablation
and the selection grid; the classification policy comparison and the depth
probe. Each is a tuple of dotted config overrides, one results row each.

  config.sweep = sweeps.policy_comparison()
  python eval.py --config configs/quickstart.py:sweep=lvtp_ablation ...

Every setting runs on the same checkpoint with no fine-tuning; the rows'
names are unique so that eval.py can add them to an existing results.json.
"""

from typing import Any, Dict, List, Tuple

import ml_collections

from lvtp_jax import pruning

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
# The exiting patches of each predicted class leave one merged summary slot
# behind (config.pruning.exit_summary; ours, not from either paper).
SUMMARY = {'pruning.exit_summary': 'per_class'}
# The coarse colour edge score (ours): the largest R, G, B Sobel magnitude on
# 4 x 4 pixel block means, in place of the spec's luma Sobel on the pixels.
COLOUR_EDGES = {'pruning.lvtp.edge_color': 'rgb', 'pruning.lvtp.edge_scale': 4}


def policy_comparison() -> Sweep:
  """The unpruned model, the random floor, DToP (p0 0.95, 0.9; and with exit
  summaries at 0.9 and 0.8), LVTP-R (spec defaults; with exit summaries; and
  with exit summaries and a 3- or 4-cluster edge pass): each in masked mode
  (the exact algorithm: quality and effective GFLOPs) and in buffer mode
  (real savings: realized GFLOPs and measured speed-up)."""
  lvtp = {'pruning.name': 'lvtp'}
  policies = [
      ('random', {'pruning.name': 'random',
                  'pruning.random.exit_fraction': (0.3,)}),
      ('dtop_p0.95', {'pruning.name': 'dtop',
                      'pruning.dtop.threshold': 0.95}),
      ('dtop_p0.9', {'pruning.name': 'dtop', 'pruning.dtop.threshold': 0.9}),
      ('dtop_p0.9_sum', {'pruning.name': 'dtop',
                         'pruning.dtop.threshold': 0.9, **SUMMARY}),
      ('dtop_p0.8_sum', {'pruning.name': 'dtop',
                         'pruning.dtop.threshold': 0.8, **SUMMARY}),
      ('lvtp', lvtp),
      ('lvtp_sum', dict(lvtp, **SUMMARY)),
      ('lvtp_sum_k3', dict(lvtp, **SUMMARY, **{'pruning.lvtp.k2': 3})),
      ('lvtp_sum_k4', dict(lvtp, **SUMMARY, **{'pruning.lvtp.k2': 4})),
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
  budgets, the confidence floor, context rules, the label-boundary guard,
  logits instead of frozen probabilities, the interpolated fill, and the
  exit summaries with the edge-pass variants they make affordable."""
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
      ('label_boundary3', {'pruning.lvtp.label_boundary': 3}),
      ('logits', {'pruning.lvtp.reassemble': 'logits'}),
      ('ctx5', LVTP_CONTEXT),
      ('sum', SUMMARY),
      ('sum_no_edge_rescue', dict(SUMMARY, **{'pruning.lvtp.passes': 1})),
      ('sum_no_edge_rescue_lb3', dict(SUMMARY, **{
          'pruning.lvtp.passes': 1, 'pruning.lvtp.label_boundary': 3})),
      ('sum_k3', dict(SUMMARY, **{'pruning.lvtp.k2': 3})),
      ('sum_k3_q1', dict(SUMMARY, **{'pruning.lvtp.k2': 3,
                                     'pruning.lvtp.qs': (1.0,),
                                     'pruning.lvtp.weighting': 'single'})),
      ('sum_k3_per_class', dict(SUMMARY, **{
          'pruning.lvtp.k2': 3, 'pruning.lvtp.clustering': 'per_class'})),
      ('sum_k4', dict(SUMMARY, **{'pruning.lvtp.k2': 4})),
      ('sum_k3_budget0.3', dict(SUMMARY, **{'pruning.lvtp.k2': 3,
                                            'pruning.lvtp.max_exit_frac':
                                                (0.3,)})),
      ('interpolate', {'pruning.lvtp.pruned_fill': 'interpolate'}),
      ('rgb4', COLOUR_EDGES),
      ('sum_rgb4', dict(SUMMARY, **COLOUR_EDGES)),
      ('sum_rgb4_k3', dict(SUMMARY, **COLOUR_EDGES, **{'pruning.lvtp.k2': 3})),
  ]
  return tuple(dict({'pruning.name': 'lvtp'}, **v, **_NO_MAPS,
                    **{'eval.name': f'lvtp/{name}'}) for name, v in variants)


def selection_grid() -> Sweep:
  """The settings lvtp_jax.evaluation.selection chooses from on held-out
  images (masked mode): 20 DToP and 31 LVTP-R settings over the same cost
  range.

  DToP: its confidence threshold p0 from 0.5 to 0.95, with and without
  exit summaries, and its context rule (top_k 0 or 10 instead of 5) at
  p0 0.8 with summaries (20 settings).
  LVTP-R, over the knobs of the spec's tuning table (§4) that trade cost
  for quality: the edge pass's clusters k2 (2-4) and the label-boundary
  guard (off, 3); no edge pass; a 3-cluster semantic pass; the confidence
  floor; the edge pass's gap guard gap2 (0.15, 0.3: rescue nothing unless
  the edge clusters separate by that much, the knob that moves the cost
  between k2=2 and k2=3 settings); Sobel max and density pooling; all with
  exit summaries; and the spec's defaults and k2=3 without them (20
  settings). Then the same knobs with the coarse colour edge score
  (COLOUR_EDGES, `_rgb4`): k2 2-4 with and without the label-boundary
  guard, gap2 0.15 / 0.3, max pooling, and without summaries (11 settings).
  """
  grid = []
  for p0 in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
    dtop = {'pruning.name': 'dtop', 'pruning.dtop.threshold': p0}
    grid.append((f'dtop_p{p0}', dtop))
    grid.append((f'dtop_p{p0}_sum', dict(dtop, **SUMMARY)))
  for top_k in (0, 10):
    grid.append((f'dtop_p0.8_sum_top{top_k}', dict(
        SUMMARY, **{'pruning.name': 'dtop', 'pruning.dtop.threshold': 0.8,
                    'pruning.dtop.top_k': top_k})))
  lvtp = {'pruning.name': 'lvtp'}
  grid.append(('lvtp', lvtp))
  grid.append(('lvtp_k3', dict(lvtp, **{'pruning.lvtp.k2': 3})))
  with_sum = dict(lvtp, **SUMMARY)

  def edge_clusters(prefix, base):
    """k2 2-4, each with and without the label-boundary guard."""
    for k2 in (2, 3, 4):
      for lb in (0, 3):
        grid.append((f'{prefix}_k{k2}' + (f'_lb{lb}' if lb else ''),
                     dict(base, **{'pruning.lvtp.k2': k2,
                                   'pruning.lvtp.label_boundary': lb})))

  edge_clusters('lvtp_sum', with_sum)
  for lb in (0, 3):
    grid.append(('lvtp_sum_no_edge' + (f'_lb{lb}' if lb else ''),
                 dict(with_sum, **{'pruning.lvtp.passes': 1,
                                   'pruning.lvtp.label_boundary': lb})))
  for k2 in (2, 3):
    grid.append((f'lvtp_sum_k1_3_k{k2}',
                 dict(with_sum, **{'pruning.lvtp.k1': 3,
                                   'pruning.lvtp.k2': k2})))
  for k2 in (3, 4):
    grid.append((f'lvtp_sum_k{k2}_floor0.8',
                 dict(with_sum, **{'pruning.lvtp.k2': k2,
                                   'pruning.lvtp.conf_floor': 0.8})))
  for k2 in (2, 3):
    for gap2 in (0.15, 0.3):
      grid.append((f'lvtp_sum_k{k2}_gap{gap2}',
                   dict(with_sum, **{'pruning.lvtp.k2': k2,
                                     'pruning.lvtp.gap2': gap2})))
  for pool in ('max', 'density'):
    grid.append((f'lvtp_sum_{pool}', dict(with_sum, **{
        'pruning.lvtp.edge_pool': pool})))
  colour = dict(with_sum, **COLOUR_EDGES)
  grid.append(('lvtp_rgb4', dict(lvtp, **COLOUR_EDGES)))
  edge_clusters('lvtp_sum_rgb4', colour)
  for gap2 in (0.15, 0.3):
    grid.append((f'lvtp_sum_rgb4_k2_gap{gap2}',
                 dict(colour, **{'pruning.lvtp.gap2': gap2})))
  for k2 in (2, 3):
    grid.append((f'lvtp_sum_rgb4_max_k{k2}',
                 dict(colour, **{'pruning.lvtp.edge_pool': 'max',
                                 'pruning.lvtp.k2': k2})))
  return tuple(dict(setting, **{'eval.name': name}) for name, setting in grid)


def testbed_grid() -> Sweep:
  """The settings the segmentation test bed (configs/benchmark_seg.py)
  chooses from on held-out images, smaller than selection_grid() because
  each costs 12 blocks x 257 tokens on 500 images: the random floor at
  exit fractions 0.2-0.8 (at both heads), DToP at p0 0.5-0.95 (the
  official rule), LVTP-R (spec defaults; with exit summaries; with
  summaries and a 3-cluster edge pass), and the in-block reductions on
  the Segmenter, off the shelf: EViT 0.7/0.5, BAT 0.7, ToMe r 8/16, GTP
  P 8/16 (config.pruning.dense 'source'; EViT 0.7 and GTP P16 also with
  'interpolate'), and composed policies: LVTP-R with summaries + ToMe r
  8/16 in the blocks before the first auxiliary head, DToP p0 0.8 + ToMe
  r 16; and DToP p0 0.5 / 0.8 with LVTP-R's per-class exit summaries
  (family 'dtop (summaries)', chosen apart from DToP's official rule)."""
  grid = [('unpruned', {})]
  for f in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
    grid.append((f'random{f}', {'pruning.name': 'random',
                                'pruning.random.exit_fraction': (f,)}))
  for p0 in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
    grid.append((f'dtop_p{p0}', {'pruning.name': 'dtop',
                                 'pruning.dtop.threshold': p0}))
  lvtp = {'pruning.name': 'lvtp'}
  grid.append(('lvtp', lvtp))
  grid.append(('lvtp_sum', dict(lvtp, **SUMMARY)))
  grid.append(('lvtp_sum_k3', dict(lvtp, **SUMMARY, **{'pruning.lvtp.k2': 3})))
  for keep in (0.7, 0.5):
    grid.append((f'evit{keep}', {'pruning.name': 'evit',
                                 'pruning.evit.keep_rate': keep}))
  grid.append(('bat0.7', {'pruning.name': 'bat', 'pruning.bat.keep_rate': 0.7}))
  for r in (8, 16):
    grid.append((f'tome_r{r}', {'pruning.name': 'tome', 'pruning.tome.r': r}))
  for num_prop in (8, 16):
    grid.append((f'gtp_P{num_prop}', {'pruning.name': 'gtp',
                                      'pruning.gtp.num_prop': num_prop}))
  interp = {'pruning.dense': 'interpolate'}
  grid.append(('evit0.7_interp', dict(interp, **{
      'pruning.name': 'evit', 'pruning.evit.keep_rate': 0.7})))
  grid.append(('gtp_P16_interp', dict(interp, **{
      'pruning.name': 'gtp', 'pruning.gtp.num_prop': 16})))
  for r in (8, 16):
    grid.append((f'lvtp_sum+tome_r{r}', dict(SUMMARY, **{
        'pruning.name': 'lvtp+tome', 'pruning.tome.r': r})))
  grid.append(('dtop_p0.8+tome_r16', {
      'pruning.name': 'dtop+tome', 'pruning.dtop.threshold': 0.8,
      'pruning.tome.r': 16}))
  for p0 in (0.5, 0.8):   # Not DToP's own rule: chosen as its own family.
    grid.append((f'dtop_p{p0}_sum', dict(SUMMARY, **{
        'pruning.name': 'dtop', 'pruning.dtop.threshold': p0,
        'eval.family': 'dtop (summaries)'})))
  return tuple(dict(setting, **{'eval.name': name}) for name, setting in grid)


def settings(config: ml_collections.ConfigDict
             ) -> List[ml_collections.ConfigDict]:
  """One config per evaluation setting of config.sweep.

  config.sweep is a sequence of override dicts with dotted keys, e.g.
  ({'eval.name': 'dense'}, {'pruning.name': 'dtop',
  'pruning.dtop.threshold': 0.9}); each gives one results row. An empty
  sweep means one setting: the config as it is. config.pruning is completed
  with every default first (lvtp_jax.pruning.config_defaults), so a sweep
  can set any policy's field.
  """
  overrides = list(config.get('sweep', ()) or ()) or [{}]
  settings = []
  for i, override in enumerate(overrides):
    setting = ml_collections.ConfigDict(config.to_dict())
    setting.pruning = pruning.resolve(setting.get('pruning'))
    for key, value in dict(override).items():
      *parents, leaf = key.split('.')
      node = setting
      for name in parents:
        node = node.get(name) if isinstance(node, ml_collections.ConfigDict) \
            else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f'config.sweep[{i}] sets {key!r}, which is not a '
                         'config field; check the spelling against the '
                         'config.')
      try:
        node[leaf] = value
      except TypeError:
        raise ValueError(
            f'config.sweep[{i}] sets {key!r} to {value!r}, but the field '
            f'holds a {type(node[leaf]).__name__} ({node[leaf]!r}).') from None
    settings.append(setting)
  return settings


# The official GTP-ViT README's best (sparsity, alpha) per num_prop for
# DeiT-B (MixedAttnMax, Mixed graph, token scales on), from its
# hyper-parameter search on ImageNet.
GTP_README = {1: (0.8, 0.1), 2: (0.7, 0.1), 3: (0.9, 0.4), 4: (1.0, 0.4),
              5: (0.6, 0.15), 6: (0.6, 0.15), 7: (0.6, 0.1), 8: (0.6, 0.1),
              9: (0.7, 0.2), 10: (0.5, 0.2), 11: (0.8, 0.3), 12: (0.8, 0.3),
              13: (0.7, 0.3), 14: (0.8, 0.3)}


def classification_policies(keep_rates: Tuple[float, ...] = (
    0.9, 0.8, 0.7, 0.6, 0.5), tome_rs: Tuple[int, ...] = (1, 2, 3, 4, 5),
                            random_rates: Tuple[float, ...] = (0.9, 0.7, 0.5),
                            bat_rates: Tuple[float, ...] = (0.9, 0.7, 0.5),
                            gtp_props: Tuple[int, ...] = (1, 2, 3, 4, 5),
                            maps: Tuple[str, ...] = ('random0.7', 'evit0.7',
                                                     'tome_r3', 'bat0.7',
                                                     'gtp_P3')
                            ) -> Sweep:
  """In-block reductions off the shelf, buffer mode, one row each: the
  unpruned model, the random baseline at EViT's token counts
  (random_drop), EViT at each keep rate, ToMe at each r, BAT at each keep
  rate, GTP at each num_prop with its defaults (gtp_P<r>) and with the
  official README's recommended settings for that num_prop where it has
  them (gtp_readme_P<r>, family 'gtp (README)': token scales on, the
  README's sparsity and alpha; GTP_README). The settings named in `maps`
  also draw their token maps (eval.token_maps images)."""
  def one(name, policy, field, value, **more):
    return {'eval.name': name, 'pruning.mode': 'buffer',
            'pruning.name': policy, f'pruning.{policy}.{field}': value,
            **more}

  rows = [{'eval.name': 'none'}]
  rows += [one(f'random{v:g}', 'random_drop', 'keep_rate', v)
           for v in random_rates]
  rows += [one(f'evit{v:g}', 'evit', 'keep_rate', v) for v in keep_rates]
  rows += [one(f'tome_r{v}', 'tome', 'r', v) for v in tome_rs]
  rows += [one(f'bat{v:g}', 'bat', 'keep_rate', v) for v in bat_rates]
  rows += [one(f'gtp_P{v}', 'gtp', 'num_prop', v) for v in gtp_props]
  rows += [one(f'gtp_readme_P{v}', 'gtp', 'num_prop', v,
               **{'eval.family': 'gtp (README)',
                  'pruning.gtp.token_scale': True,
                  'pruning.gtp.sparsity': GTP_README[v][0],
                  'pruning.gtp.alpha': GTP_README[v][1]})
           for v in gtp_props if v in GTP_README]
  return tuple(dict(row, **({} if row['eval.name'] in maps else
                            {'eval.token_maps': 0})) for row in rows)


def depth_probe(depth: int = 12, keep_rate: float = 0.25) -> Sweep:
  """When does the model know? One row per block L: keep_rate of the patch
  tokens kept (random_drop and EViT, no fused token) inside block L only,
  after its attention. If top-1 holds when 75% of the tokens go at block 1,
  the label is read in the first attention layer and no reduction at a
  later block can change it."""
  buffer = {'pruning.mode': 'buffer', 'eval.token_maps': 0,
            'eval.in_plots': False}
  rows = [{'eval.name': 'none', 'eval.token_maps': 0}]
  for layer in range(1, depth):
    for name, prefix in (('random_drop', 'random'), ('evit', 'evit')):
      rows.append(dict(buffer, **{
          'eval.name': f'{prefix}{keep_rate:g}@{layer}',
          'pruning.name': name, f'pruning.{name}.keep_rate': keep_rate,
          f'pruning.{name}.layers': (layer,),
          f'pruning.{name}.fuse_token': False}))
  return tuple(rows)
