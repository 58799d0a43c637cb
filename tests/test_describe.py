"""`python -m lvtp_jax.pruning`: every config.pruning field has a meaning.

Every field of every registered policy's config_defaults() (nested blocks
included) and every general field has a non-empty one-line meaning, no
meaning is kept for a field that does not exist, and no meaning names one:
field names in a meaning are either in backticks (`keep_rate`, checked),
inside quotes as values ('exit_last'), or plain identifiers with an
underscore, which must then be fields too.
"""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from lvtp_jax import pruning
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.pruning import describe
from lvtp_jax.pruning import registry
from lvtp_jax.pruning import spec
from lvtp_jax.pruning.policies import bat
from lvtp_jax.pruning.policies import gtp
from lvtp_jax.pruning.policies import lvtp
from lvtp_jax.pruning.policies.lvtp import lowlevel
from lvtp_jax.pruning.policies.lvtp import tsallis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A quoted value ('exit_last', 'MixedAttnMax', ''), not an apostrophe.
_VALUE = re.compile(r"'[\w.+/-]*'")
_BACKTICK = re.compile(r'`([^`]*)`')
_IDENTIFIER = re.compile(r'\b[a-z][a-z0-9]+(?:_[a-z0-9]+)+\b')
_CONFIG_PATH = re.compile(r'\bconfig\.[a-z0-9_.]*[a-z0-9_]')
_MODEL_FIELDS = {f.name for f in dataclasses.fields(seg_lib.Segmenter)}
# Fields that take one of a list of values: the meaning names every value,
# so a value added to the code without a word here fails.
_CHOICES = {
    'mode': spec.MODES, 'overflow': spec.OVERFLOW_RULES,
    'aux_source': spec.AUX_SOURCES, 'exit_summary': spec.EXIT_SUMMARIES,
    'dense': spec.DENSE, 'decode': spec.DECODE,
    'dtop.reassemble': spec.REASSEMBLE, 'random.reassemble': spec.REASSEMBLE,
    'lvtp.reassemble': spec.REASSEMBLE, 'lvtp.clustering': lvtp.CLUSTERINGS,
    'lvtp.pruned_fill': lvtp.PRUNED_FILL,
    'lvtp.weighting': tsallis.WEIGHTINGS, 'lvtp.edge_pool': lowlevel.POOLS,
    'lvtp.edge_color': lowlevel.COLORS, 'lvtp.lowlevel': lowlevel.FEATURES,
    'bat.cluster_weights': bat.CLUSTER_WEIGHTS,
    'bat.match_metric': bat.MATCH_METRICS,
    'gtp.selection': gtp.SELECTIONS, 'gtp.graph_type': gtp.GRAPH_TYPES,
    'gtp.orphan_src': gtp.ORPHAN_SRC,
}


def _unnamed_choices(path, meaning):
  """The values of choice field `path` that `meaning` does not name
  ('XMax' may be written 'XMean/Max')."""
  return [c for c in _CHOICES.get(path, ())
          if f"'{c}'" not in meaning and not re.search(rf'\b{c}\b', meaning)
          and not (c.endswith('Max') and f'{c[:-3]}Mean/Max' in meaning)]


def _own_policies():
  """The policies of this package (tests may register others)."""
  return [name for name in pruning.names()
          if type(registry.get(name)).__module__.startswith('lvtp_jax.')]


def _general_paths():
  return {path for path, _, _ in describe.general_fields()}


def _names_unknown_fields(text, own):
  """The field names `text` mentions that are neither in `own` (paths of
  the policy's block, or general paths), nor a full config path that
  exists."""
  general = _general_paths()
  known = own | general | {p.rsplit('.', 1)[-1] for p in own | general}
  defaults = pruning.config_defaults()
  bad = []
  for path in _CONFIG_PATH.findall(text):
    parts = path.split('.')
    if parts[1] == 'model':
      ok = len(parts) == 3 and parts[2] in _MODEL_FIELDS
    else:
      node = defaults
      ok = parts[1] == 'pruning'
      for part in parts[2:]:
        ok = ok and hasattr(node, 'keys') and part in node
        node = node[part] if ok else None
    if not ok:
      bad.append(path)
  text = _CONFIG_PATH.sub(' ', text)
  bad += [name for name in _BACKTICK.findall(text) if name not in known]
  plain = _VALUE.sub(' ', _BACKTICK.sub(' ', text))
  bad += [name for name in _IDENTIFIER.findall(plain) if name not in known]
  return bad


def test_every_general_field_has_a_meaning():
  fields = describe.general_fields()
  assert {'name', 'mode', 'layers', 'aux_source', 'capacities', 'overflow',
          'exit_summary', 'dense', 'calibrate.images', 'calibrate.quantile',
          'calibrate.split'} <= {path for path, _, _ in fields}
  for path, _, meaning in fields:
    assert meaning.strip(), f'config.pruning.{path} has no meaning in ' \
                            'describe.GENERAL_HELP'
  stale = set(describe.GENERAL_HELP) - _general_paths()
  assert not stale, f'describe.GENERAL_HELP explains no-longer fields {stale}'
  for path, meaning in describe.GENERAL_HELP.items():
    assert not _names_unknown_fields(meaning, set()), (path, meaning)
    assert not _unnamed_choices(path, meaning), (path, meaning)
  assert set(describe.SIGNAL_HELP) == set(registry.SIGNALS)


@pytest.mark.parametrize('name', _own_policies())
def test_every_policy_field_has_a_meaning(name):
  policy = registry.get(name)
  assert policy.summary.strip(), f'{type(policy).__name__} has no summary'
  fields = describe.policy_fields(policy)
  paths = {path for path, _, _ in fields}
  for path, _, meaning in fields:
    assert meaning.strip(), (f'config.pruning.{name}.{path} has no meaning '
                             f'in {type(policy).__name__}.field_help')
    missing = _unnamed_choices(f'{name}.{path}', meaning)
    assert not missing, f'{name}.{path}: the meaning lacks values {missing}'
  stale = set(policy.field_help) - paths
  assert not stale, (f'{type(policy).__name__}.field_help explains fields '
                     f'its config_defaults() lacks: {sorted(stale)}')
  for key, text in [('summary', policy.summary)] + sorted(
      policy.field_help.items()):
    bad = _names_unknown_fields(text, paths)
    assert not bad, f'{name} {key} names unknown fields {bad}: {text!r}'


def test_summaries_are_not_inherited():
  summaries = [registry.get(name).summary for name in _own_policies()]
  assert len(set(summaries)) == len(summaries)


def test_the_checker_catches_unknown_fields():
  own = {'keep_rate', 'layers'}
  assert not _names_unknown_fields(
      "`keep_rate` of the `layers`; 'exit_last', the model's "
      "'per_class'; config.pruning.tome.r, config.model.aux_layers", own)
  assert _names_unknown_fields('see `keep_ratio`', own) == ['keep_ratio']
  assert _names_unknown_fields('with fuse_tokens', own) == ['fuse_tokens']
  assert _names_unknown_fields('config.pruning.tome.q', own) == [
      'config.pruning.tome.q']
  assert _unnamed_choices('dense', "'source' only") == ['interpolate',
                                                         'canvas']
  assert _unnamed_choices('gtp.graph_type', "'Spatial', Mixed") == [
      'Semantic']
  assert 'CLSAttnMax' not in _unnamed_choices('gtp.selection',
                                              'CLSAttnMean/Max')


def test_the_listing(capsys):
  assert describe.main([]) == 0
  out = capsys.readouterr().out
  for name in _own_policies():
    assert f'\n{name}  [kind: ' in out
  assert 'config.pruning.lvtp.max_exit_frac = (1.0,)' in out
  assert 'config.pruning.calibrate.quantile = 1.0' in out
  assert describe.main(['tome']) == 0
  out = capsys.readouterr().out
  assert out.startswith('tome  [kind: reduce; signals: keys]')
  assert 'config.pruning.tome.r = 13' in out and 'dtop' not in out
  assert 'General fields' not in out
  assert describe.main(['--general']) == 0
  out = capsys.readouterr().out
  assert out.startswith('General fields') and 'config.pruning.tome' not in out
  with pytest.raises(SystemExit):
    describe.main(['no_such_policy'])
  assert 'no_such_policy' in capsys.readouterr().err


def test_the_command_line():
  run = subprocess.run([sys.executable, '-m', 'lvtp_jax.pruning', 'dtop'],
                       cwd=REPO, capture_output=True, text=True, check=True)
  assert run.stdout.startswith('dtop  [kind: exit; signals: aux_logits]')
  assert 'config.pruning.dtop.threshold = 0.9' in run.stdout
