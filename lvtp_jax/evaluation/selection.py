"""Choose each policy's setting on a held-out split, then report it on validation.

  python -m lvtp_jax.evaluation.selection \
      --config configs/quickstart.py:sweep=selection --workdir runs/quickstart
  python -m lvtp_jax.evaluation.selection \
      --config configs/quickstart_cls.py:sweep=policies \
      --workdir runs/quickstart_cls --cuts 0.2,0.3,0.4

Classifiers (config.task 'classification', run_classification) follow the
same steps with top-1 as the metric, buffer mode throughout (in-block
reductions are exact there), and add a paired image bootstrap of top-1
between every two picks at each cut (WORKDIR/selection/paired.json).

Tuning a policy's knobs on the images its numbers are reported on flatters
whichever policy has more knobs. This is the honest protocol instead:

1. Every setting of config.sweep (a grid, e.g. sweeps.selection_grid())
   is evaluated in masked mode on the held-out split `--split` (for
   synthetic_scenes the 'selection' split: 500 images seen neither in
   training nor in the reported numbers; for a real dataset, a slice of
   'train' that the training run left out, e.g. --split='train[-500:]'
   after training on config.data.train_split='train[:-500]'). Those rows
   go to WORKDIR/selection/results.json, with their own Pareto plots
   (--reuse_grid takes the rows an earlier run evaluated with the same
   setting and weights instead).
2. For every policy of the grid and every cut c of `--cuts`, the chosen
   setting is the one with the best `--metric` on that split among those
   whose effective GFLOPs are at most (1 - c) x the unpruned model's on the
   same split (ties: the cheaper). A policy with no setting that cheap has
   no pick at that cut, and the table says so.
3. Each chosen setting is evaluated once on config.data.split
   (validation) in masked mode and, with `--buffer`, in buffer mode
   (calibrated capacities, as in sweeps.BUFFER); these rows are added to
   WORKDIR/results.json as 'pick/<grid setting>[/buffer]', with a
   'selection' record (split, metric, the cuts it was chosen for, its
   value there).
4. WORKDIR/selection/picks.json holds the picks; a Markdown table of them
   (selection split and validation side by side) is printed.

Nothing is chosen by looking at validation numbers.
"""

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from lvtp_jax.evaluation import plots
from lvtp_jax.evaluation import results
from lvtp_jax.evaluation import segmentation
from lvtp_jax.evaluation import sweeps

METRICS = ('miou', 'boundary_miou', 'pixel_accuracy')
CLASSIFICATION_METRICS = ('top1',)
# Grid rows are only compared on quality and effective GFLOPs: one short
# timing round each, and no exit maps.
_GRID_EVAL = {'eval.exit_maps': 0, 'eval.timing_rounds': 1,
              'eval.timing_iters': 2, 'eval.warmup': 1}


def grid_overrides(config: ml_collections.ConfigDict,
                   split: str) -> Tuple[Dict[str, Any], ...]:
  """config.sweep with every setting on `split`, in masked mode, untimed,
  plus the unpruned reference (named 'unpruned') when the grid lacks one."""
  grid = list(config.get('sweep', ()) or ())
  if not grid:
    raise ValueError('config.sweep is empty: give the grid to choose from, '
                     'e.g. --config configs/quickstart.py:sweep=selection '
                     '(sweeps.selection_grid()).')
  names = [g.get('eval.name', '') for g in grid]
  if '' in names or len(set(names)) != len(names):
    raise ValueError('every setting of the grid needs its own eval.name; got '
                     f'{names}.')
  if not any(g.get('pruning.name', 'none') == 'none' for g in grid):
    grid = [{'eval.name': 'unpruned'}] + grid
  out = []
  for g in grid:
    if g.get('pruning.mode', 'masked') != 'masked':
      raise ValueError(f'grid setting {g["eval.name"]!r} is not in masked '
                       'mode: choose on the exact algorithm (buffer mode only '
                       'changes where overflowing patches go, and is '
                       'evaluated for the picks with --buffer).')
    out.append(dict(g, **_GRID_EVAL, **{'data.split': split}))
  return tuple(out)


def choose(rows: Sequence[Dict[str, Any]], cuts: Sequence[float],
           metric: str) -> List[Dict[str, Any]]:
  """The picks (module docstring, step 2) from the grid's rows.

  Rows are grouped by their `family` when they have one (e.g. GTP with the
  official README's settings, 'gtp (README)'), else by policy.

  Returns one record per (cut, policy), in the order of cuts, then policy
  names: dict(cut, policy, budget_gflops, name (the grid row, None when no
  setting is cheap enough), value, gflops_effective).
  """
  if metric not in METRICS + CLASSIFICATION_METRICS:
    raise ValueError(f'metric={metric!r}; known: '
                     f'{METRICS + CLASSIFICATION_METRICS}.')
  lacking = [r.get('name') for r in rows if metric not in r]
  if lacking:
    raise ValueError(f'metric={metric!r} is not in the rows {lacking}: '
                     'choose by a metric the grid was evaluated with.')
  for cut in cuts:
    if not 0 < cut < 1:
      raise ValueError(f'cut={cut}: a fraction of the unpruned GFLOPs in '
                       '(0, 1), e.g. 0.3 for a 30% cut.')
  reference = [r for r in rows if r['policy'] == 'none']
  if not reference:
    raise ValueError('the grid has no unpruned row to measure cuts from.')
  full = reference[0]['gflops_effective']
  group = lambda r: r.get('family') or r['policy']
  policies = sorted({group(r) for r in rows if r['policy'] != 'none'})
  picks = []
  for cut in cuts:
    budget = (1 - cut) * full
    for policy in policies:
      fits = [r for r in rows if group(r) == policy and r['policy'] != 'none'
              and r['gflops_effective'] <= budget]
      best = max(fits, key=lambda r: (r[metric], -r['gflops_effective']),
                 default=None)
      picks.append(dict(
          cut=cut, policy=policy, budget_gflops=budget,
          name=best['name'] if best else None,
          value=best[metric] if best else None,
          gflops_effective=best['gflops_effective'] if best else None))
  return picks


def pick_name(grid_name: str) -> str:
  """The validation row of the grid setting `grid_name` once picked."""
  return f'pick/{grid_name}'


def pick_overrides(grid: Sequence[Dict[str, Any]],
                   picks: Sequence[Dict[str, Any]], buffer: bool,
                   no_maps: Dict[str, Any] = None,
                   maps: Dict[str, Any] = None
                   ) -> Tuple[Dict[str, Any], ...]:
  """The evaluation settings of the picks (module docstring, step 3): each
  chosen grid setting once (several cuts may choose the same one), as it
  was but on the config's own split, drawing no maps (`no_maps`: the
  config's override for that, segmentation's by default), or, with `maps`
  (e.g. {'eval.exit_maps': 4}), drawing them for the masked-mode rows."""
  no_maps = {'eval.exit_maps': 0} if no_maps is None else no_maps
  by_name = {g['eval.name']: g for g in grid}
  chosen = list(dict.fromkeys(p['name'] for p in picks if p['name']))
  out = []
  for name in chosen:
    setting = {k: v for k, v in by_name[name].items()
               if k not in _GRID_EVAL and k not in ('data.split', 'eval.name')}
    out.append(dict(setting, **(maps or no_maps),
                    **{'eval.name': pick_name(name)}))
    if buffer:
      out.append(dict(setting, **sweeps.BUFFER, **no_maps, **{
          'eval.name': f'{pick_name(name)}/buffer'}))
  return tuple(out)


def markdown(picks: Sequence[Dict[str, Any]], grid_rows, val_rows,
             metric: str) -> str:
  """Selection-split and validation numbers of every pick."""
  val = {r['name']: r for r in val_rows}
  grid_ref = next(r for r in grid_rows if r['policy'] == 'none')
  val_ref = next((r for r in val_rows if r['policy'] == 'none'), None)
  lines = [
      f'| cut | policy | chosen setting | {metric} (selection) | '
      'cut (selection) | mIoU (val) | boundary mIoU (val) | '
      'eff. GFLOPs (val) | cut (val) | speed-up (buffer) |',
      '|' + '---|' * 10]
  for p in picks:
    head = f'| {100 * p["cut"]:.0f}% | {p["policy"]} |'
    if p['name'] is None:
      lines.append(head + ' none this cheap | - | - | - | - | - | - | - |')
      continue
    base = pick_name(p['name'])
    r = val.get(base)
    sel_cut = 100 * (1 - p['gflops_effective'] / grid_ref['gflops_effective'])
    cells = [p['name'], f'{p["value"]:.2f}', f'{sel_cut:.1f}%']
    if r is None:
      cells += ['-'] * 5
    else:
      val_cut = (100 * (1 - r['gflops_effective'] /
                        val_ref['gflops_effective']) if val_ref else None)
      buf = val.get(f'{base}/buffer')
      cells += [f'{r["miou"]:.2f}', f'{r["boundary_miou"]:.2f}',
                f'{r["gflops_effective"]:.3f}',
                f'{val_cut:.1f}%' if val_cut is not None else '-',
                f'{buf["speedup"]:.2f}x' if buf else '-']
    lines.append(head + ' ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _jsonable(setting: Dict[str, Any]) -> Dict[str, Any]:
  """A grid setting as results.json stores it (tuples become lists)."""
  return json.loads(json.dumps(setting))


def _reusable_rows(sel_dir: str, grid: Sequence[Dict[str, Any]],
                   weights: str) -> Dict[str, Dict[str, Any]]:
  """Rows of an earlier run in sel_dir/results.json that evaluated the same
  grid setting (every override equal) with the same weights."""
  path = os.path.join(sel_dir, 'results.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = {r['name']: r for r in json.load(f).get('rows', [])}
  out = {}
  for g in grid:
    row = old.get(g['eval.name'])
    if (row is not None and row.get('setting') == _jsonable(g)
        and row.get('weights') == weights):
      out[g['eval.name']] = row
  return out


def run(config: ml_collections.ConfigDict, workdir: str, split: str,
        cuts: Sequence[float], metric: str, buffer: bool = True,
        reuse_grid: bool = False, maps: int = 4) -> Dict[str, Any]:
  """The whole protocol; returns dict(picks, grid_rows, rows, table).

  The exit and merge maps of the picks (masked mode, the first `maps`
  validation images; 0: none) go to WORKDIR/selection/exit_maps.png.

  reuse_grid: take the grid rows an earlier run left in
  WORKDIR/selection/results.json when their setting (every override) and
  weights are the same, instead of evaluating them again (to choose at
  other cuts or by another metric; the code must not have changed since).
  """
  if split == config.data.split:
    raise ValueError(f'--split={split!r} is the split the picks are reported '
                     'on (config.data.split): choose on held-out images, e.g. '
                     "--split=selection for synthetic_scenes.")
  model, params, prep, source = segmentation.build_model(config, workdir)
  grid = grid_overrides(config, split)
  sel_dir = os.path.join(workdir, 'selection')
  done = _reusable_rows(sel_dir, grid, source) if reuse_grid else {}
  todo = tuple(g for g in grid if g['eval.name'] not in done)
  fresh = []
  if todo:
    grid_config = ml_collections.ConfigDict(config.to_dict())
    grid_config.sweep = todo
    fresh, _ = segmentation.evaluate_sweep(grid_config, model, params, prep,
                                           weights=source)
    for row, setting in zip(fresh, todo):
      row['setting'] = _jsonable(setting)
  by_name = dict(done, **{r['name']: r for r in fresh})
  grid_rows = [by_name[g['eval.name']] for g in grid]
  out = results.write(sel_dir, fresh, merge=True)
  plots.write_figures(sel_dir, out['rows'], None)

  picks = choose(grid_rows, cuts, metric)
  pick_config = ml_collections.ConfigDict(config.to_dict())
  pick_config.sweep = ({'eval.name': 'unpruned', 'eval.exit_maps': 0},
                       ) + pick_overrides(
                          grid, picks, buffer,
                          maps={'eval.exit_maps': maps} if maps else None)
  rows, visuals = segmentation.evaluate_sweep(pick_config, model, params,
                                              prep, weights=source)
  if visuals['maps']:
    plots.exit_maps(visuals, os.path.join(sel_dir, 'exit_maps.png'),
                    max_settings=12)
  for row in rows:
    chosen_for = [p for p in picks if p['name'] and row['name'] in (
        pick_name(p['name']), pick_name(p['name']) + '/buffer')]
    if chosen_for:
      row['selection'] = dict(
          split=split, metric=metric, setting=chosen_for[0]['name'],
          cuts=[p['cut'] for p in chosen_for], value=chosen_for[0]['value'],
          gflops_effective=chosen_for[0]['gflops_effective'])
  # The 'unpruned' row (the cuts on validation are measured from it)
  # replaces one an earlier sweep wrote: same model, same quality.
  merged = results.write(workdir, rows, merge=True)
  plots.write_figures(workdir, [r for r in merged['rows'] if 'miou' in r],
                      None)
  with open(os.path.join(sel_dir, 'picks.json'), 'w') as f:
    json.dump(dict(split=split, metric=metric, cuts=list(cuts),
                   picks=picks), f, indent=2)
  table = markdown(picks, grid_rows, rows, metric)
  return dict(picks=picks, grid_rows=grid_rows, rows=rows, table=table)


def run_classification(config: ml_collections.ConfigDict, workdir: str,
                       split: str, cuts: Sequence[float],
                       resamples: int = 10000, seed: int = 0,
                       level: float = 0.95) -> Dict[str, Any]:
  """The protocol for a classifier (config.task == 'classification').

  The grid is config.sweep as it is (the in-block reductions are exact in
  buffer mode, masked == buffer); picks maximise top-1 on `split`; each
  pick is evaluated once on config.data.split with its per-image hits, and
  at every cut every pair of picks is compared by a paired image bootstrap
  (paired.compare_accuracy: resamples, seed, level). Writes
  WORKDIR/selection/{results,picks,paired}.json and the pick rows of
  WORKDIR/results.json; returns dict(picks, grid_rows, rows, paired, table).
  """
  from lvtp_jax.evaluation import classification  # pylint: disable=g-import-not-at-top
  from lvtp_jax.evaluation import paired  # pylint: disable=g-import-not-at-top
  if split == config.data.split:
    raise ValueError(f'--split={split!r} is the split the picks are reported '
                     'on (config.data.split): choose on held-out images, e.g. '
                     "--split=selection for synthetic_objects.")
  grid = list(config.get('sweep', ()) or ())
  if not any(g.get('pruning.name', 'none') == 'none' for g in grid):
    grid = [{'eval.name': 'unpruned'}] + grid
  quick = {'eval.token_maps': 0, 'eval.timing_rounds': 1,
           'eval.timing_iters': 2, 'eval.warmup': 1}
  model, params, prep, weights = classification.load_model(config, workdir)
  grid_config = ml_collections.ConfigDict(config.to_dict())
  grid_config.sweep = tuple(dict(g, **quick, **{'data.split': split})
                            for g in grid)
  grid_rows, _ = classification.evaluate_sweep(grid_config, model, params,
                                               prep, weights=weights)
  for row, setting in zip(grid_rows, grid):
    row['setting'] = _jsonable(setting)
  sel_dir = os.path.join(workdir, 'selection')
  results.write(sel_dir, grid_rows, merge=True)
  plots.write_figures(sel_dir, grid_rows, None)

  picks = choose(grid_rows, cuts, 'top1')
  no_maps = {'eval.token_maps': 0}
  pick_config = ml_collections.ConfigDict(config.to_dict())
  pick_config.sweep = ((dict(no_maps, **{'eval.name': 'unpruned'}),)
                       + pick_overrides(grid, picks, False, no_maps))
  rows, extra = classification.evaluate_sweep(
      pick_config, model, params, prep, weights=weights, per_image=True)
  hits = extra['correct']
  for row in rows:
    chosen_for = [p for p in picks
                  if p['name'] and row['name'] == pick_name(p['name'])]
    if chosen_for:
      row['selection'] = dict(
          split=split, metric='top1', setting=chosen_for[0]['name'],
          cuts=[p['cut'] for p in chosen_for], value=chosen_for[0]['value'],
          gflops_effective=chosen_for[0]['gflops_effective'])
  merged = results.write(workdir, rows, merge=True)
  plots.write_figures(workdir, [r for r in merged['rows'] if 'top1' in r],
                      None)
  counts = paired.bootstrap_counts(len(hits['unpruned']), resamples, seed)
  comparisons = []
  for cut in cuts:
    at = [p for p in picks if p['cut'] == cut and p['name']]
    for i, pa in enumerate(at):
      for pb in at[i + 1:]:
        a, b = pick_name(pa['name']), pick_name(pb['name'])
        comparisons.append(dict(
            cut=cut, a=pa['name'], b=pb['name'], policy_a=pa['policy'],
            policy_b=pb['policy'], resamples=resamples, seed=seed,
            level=level, top1=paired.compare_accuracy(hits[a], hits[b],
                                                      counts, level)))
  with open(os.path.join(sel_dir, 'picks.json'), 'w') as f:
    json.dump(dict(split=split, metric='top1', cuts=list(cuts),
                   picks=picks), f, indent=2)
  with open(os.path.join(sel_dir, 'paired.json'), 'w') as f:
    json.dump(comparisons, f, indent=2)
  table = classification_markdown(picks, rows, comparisons, level)
  return dict(picks=picks, grid_rows=grid_rows, rows=rows,
              paired=comparisons, table=table)


def classification_markdown(picks, rows, comparisons, level) -> str:
  """The picks (selection and validation top-1, cut, speed-up) and the
  paired differences, as Markdown."""
  val = {r['name']: r for r in rows}
  full = val['unpruned']['gflops_effective']
  lines = ['| cut | policy | chosen setting | top-1 (selection) | top-1 (val) '
           '| eff. GFLOPs (val) | cut (val) | speed-up |', '|' + '---|' * 8]
  for p in picks:
    head = f'| {100 * p["cut"]:.0f}% | {p["policy"]} |'
    if p['name'] is None:
      lines.append(head + ' none this cheap | - | - | - | - | - |')
      continue
    r = val[pick_name(p['name'])]
    lines.append(
        f'{head} {p["name"]} | {p["value"]:.2f} | {r["top1"]:.2f} | '
        f'{r["gflops_effective"]:.4f} | '
        f'{100 * (1 - r["gflops_effective"] / full):.1f}% | '
        f'{r.get("speedup", 1.0):.2f}x |')
  lines += ['', '| cut | A | B | top-1 A | top-1 B | B - A | '
            f'{100 * level:.0f}% interval | P(B >= A) |', '|' + '---|' * 8]
  for c in comparisons:
    m = c['top1']
    lines.append(f'| {100 * c["cut"]:.0f}% | {c["a"]} | {c["b"]} | '
                 f'{m["a"]:.2f} | {m["b"]:.2f} | {m["diff"]:+.2f} | '
                 f'[{m["low"]:+.2f}, {m["high"]:+.2f}] | {m["p_b_ge_a"]:.3f} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if f.config.get('task', 'segmentation') == 'classification':
    out = run_classification(f.config, f.workdir, f.split,
                             [float(c) for c in f.cuts],
                             resamples=f.resamples, seed=f.seed)
    print(out['table'])
    print(f'wrote {f.workdir}/selection/ (results, picks, paired .json) and '
          f'the pick rows of {f.workdir}/results.json')
    return
  out = run(f.config, f.workdir, f.split, [float(c) for c in f.cuts],
            f.metric, f.buffer, f.reuse_grid, f.maps)
  print(out['table'])
  print(f'wrote {f.workdir}/selection/results.json, '
        f'{f.workdir}/selection/picks.json and the pick rows of '
        f'{f.workdir}/results.json')


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'experiment config whose '
                                  'sweep is the grid', lock_config=False)
  flags.DEFINE_string('workdir', None, 'training workdir (its checkpoint is '
                      'evaluated, its results.json receives the picks)')
  flags.DEFINE_string('split', 'selection', 'held-out split the settings '
                      'are chosen on')
  flags.DEFINE_list('cuts', ['0.3', '0.4'], 'effective-GFLOPs cuts, as '
                    'fractions of the unpruned model')
  flags.DEFINE_enum('metric', 'boundary_miou', list(METRICS),
                    'what the pick maximises')
  flags.DEFINE_bool('buffer', True, 'also evaluate every pick in buffer mode '
                    '(speed-up)')
  flags.DEFINE_bool('reuse_grid', False, 'reuse the grid rows of an earlier '
                    'run with the same settings and weights (run())')
  flags.DEFINE_integer('resamples', 10000, 'classification: bootstrap '
                       'resamples of the paired comparisons')
  flags.DEFINE_integer('seed', 0, 'classification: bootstrap seed')
  flags.DEFINE_integer('maps', 4, 'segmentation: validation images whose '
                       'exit / merge maps are drawn for every pick '
                       '(selection/exit_maps.png; 0: none)')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  # Defined here, not at import: eval.py defines flags of the same names.
  _define_flags()
  app.run(main)
