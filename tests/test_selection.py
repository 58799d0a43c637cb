"""The choice rule of lvtp_jax.evaluation.selection, on hand-made rows."""

import ml_collections
import pytest

from lvtp_jax.evaluation import selection
from lvtp_jax.evaluation import sweeps


def _row(name, policy, gflops, miou, biou):
  return dict(name=name, policy=policy, gflops_effective=gflops, miou=miou,
              boundary_miou=biou)


ROWS = [
    _row('unpruned', 'none', 1.0, 50.0, 40.0),
    _row('a_cheap', 'a', 0.5, 45.0, 35.0),
    _row('a_mid', 'a', 0.65, 48.0, 38.0),
    _row('a_mid_same', 'a', 0.6, 47.0, 38.0),   # ties a_mid, cheaper
    _row('a_dear', 'a', 0.9, 49.9, 39.9),
    _row('b_dear', 'b', 0.8, 49.0, 39.0),
]


def test_best_metric_within_the_budget_ties_go_to_the_cheaper():
  picks = selection.choose(ROWS, [0.3, 0.45], 'boundary_miou')
  got = {(p['cut'], p['policy']): p['name'] for p in picks}
  assert got == {(0.3, 'a'): 'a_mid_same', (0.3, 'b'): None,
                 (0.45, 'a'): 'a_cheap', (0.45, 'b'): None}
  by_miou = selection.choose(ROWS, [0.3], 'miou')
  assert [p['name'] for p in by_miou] == ['a_mid', None]
  (first, _) = picks[:2]
  assert first['budget_gflops'] == pytest.approx(0.7)
  assert first['value'] == 38.0 and first['gflops_effective'] == 0.6


def test_rows_group_by_family_when_they_have_one():
  rows = ROWS + [dict(_row('a_readme', 'a', 0.55, 49.5, 39.5),
                      family='a (README)')]
  got = {p['policy']: p['name'] for p in selection.choose(rows, [0.3],
                                                          'boundary_miou')}
  assert got == {'a': 'a_mid_same', 'a (README)': 'a_readme', 'b': None}


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='metric'):
    selection.choose(ROWS, [0.3], 'top1')
  with pytest.raises(ValueError, match='metric'):
    selection.choose(ROWS, [0.3], 'accuracy')
  with pytest.raises(ValueError, match='cut=1.5'):
    selection.choose(ROWS, [1.5], 'miou')
  with pytest.raises(ValueError, match='no unpruned row'):
    selection.choose(ROWS[1:], [0.3], 'miou')


def test_grid_is_masked_named_and_on_the_held_out_split():
  config = ml_collections.ConfigDict(dict(sweep=sweeps.selection_grid()))
  grid = selection.grid_overrides(config, 'selection')
  assert grid[0]['eval.name'] == 'unpruned'
  assert all(g['data.split'] == 'selection' for g in grid)
  names = [g['eval.name'] for g in grid]
  assert len(set(names)) == len(names) == 52
  policies = [g.get('pruning.name') for g in grid[1:]]
  assert policies.count('dtop') == 20 and policies.count('lvtp') == 31
  colour = [g for g in grid if g.get('pruning.lvtp.edge_color') == 'rgb']
  assert len(colour) == 11 and all(g['pruning.lvtp.edge_scale'] == 4
                                   for g in colour)
  with pytest.raises(ValueError, match='not in masked mode'):
    selection.grid_overrides(ml_collections.ConfigDict(dict(sweep=(
        dict(sweeps.BUFFER, **{'eval.name': 'x', 'pruning.name': 'dtop'}),))),
                             'selection')
  with pytest.raises(ValueError, match='its own eval.name'):
    selection.grid_overrides(ml_collections.ConfigDict(dict(sweep=(
        {'pruning.name': 'dtop'},))), 'selection')
  with pytest.raises(ValueError, match='config.sweep is empty'):
    selection.grid_overrides(ml_collections.ConfigDict(dict(sweep=())),
                             'selection')


def test_grid_rows_are_reused_only_for_the_same_setting_and_weights(tmp_path):
  from lvtp_jax.evaluation import results  # pylint: disable=g-import-not-at-top
  grid = ({'eval.name': 'a', 'pruning.name': 'dtop',
           'pruning.dtop.threshold': 0.9, 'pruning.lvtp.qs': (1.0,)},
          {'eval.name': 'b', 'pruning.name': 'dtop',
           'pruning.dtop.threshold': 0.8})
  rows = [dict(name=g['eval.name'], policy='dtop', weights='ckpt/3',
               setting=selection._jsonable(g)) for g in grid]  # pylint: disable=protected-access
  results.write(str(tmp_path), rows)
  reuse = selection._reusable_rows  # pylint: disable=protected-access
  assert set(reuse(str(tmp_path), grid, 'ckpt/3')) == {'a', 'b'}
  assert reuse(str(tmp_path), grid, 'ckpt/4') == {}
  changed = (grid[0], dict(grid[1], **{'pruning.dtop.threshold': 0.7}))
  assert set(reuse(str(tmp_path), changed, 'ckpt/3')) == {'a'}
  assert reuse(str(tmp_path / 'missing'), grid, 'ckpt/3') == {}
