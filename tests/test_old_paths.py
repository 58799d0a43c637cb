"""The policies' module paths from before lvtp_jax/pruning/policies/ still
work: they are the moved modules themselves (same objects), and reaching
one as an attribute of lvtp_jax.pruning warns with the new path."""

import importlib
import os
import re
import subprocess
import sys
import warnings

import pytest

import lvtp_jax.pruning
from lvtp_jax.pruning import policies
from lvtp_jax.pruning.policies import lvtp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written out here rather than read from lvtp_jax.pruning._MOVED, so that
# dropping an old path fails this test.
OLD_TO_NEW = {
    'bat': 'policies.bat', 'dtop': 'policies.dtop', 'evit': 'policies.evit',
    'gtp': 'policies.gtp', 'none': 'policies.none',
    'random_drop': 'policies.random_drop',
    'random_exit': 'policies.random_exit', 'tome': 'policies.tome',
    'lvtp': 'policies.lvtp', 'kmeans': 'policies.lvtp.kmeans',
    'lowlevel': 'policies.lvtp.lowlevel', 'tsallis': 'policies.lvtp.tsallis',
}


@pytest.mark.parametrize('old', sorted(OLD_TO_NEW))
def test_old_path_is_the_moved_module(old):
  new = importlib.import_module(f'lvtp_jax.pruning.{OLD_TO_NEW[old]}')
  assert importlib.import_module(f'lvtp_jax.pruning.{old}') is new
  message = (f'lvtp_jax.pruning.{old} is deprecated: the module is now '
             f'lvtp_jax.pruning.{OLD_TO_NEW[old]} ')
  with pytest.warns(DeprecationWarning, match=re.escape(message)):
    assert getattr(lvtp_jax.pruning, old) is new


def test_old_import_statements_give_the_same_objects():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    # pylint: disable=g-import-not-at-top,reimported
    import lvtp_jax.pruning.lowlevel
    from lvtp_jax.pruning import tome as old_tome
    from lvtp_jax.pruning.lvtp import LVTPParams
    from lvtp_jax.pruning.tsallis import fused_uncertainty
    old_lvtp = lvtp_jax.pruning.lvtp
    old_lowlevel = lvtp_jax.pruning.lowlevel
  assert old_tome.merge is policies.tome.merge
  assert LVTPParams is lvtp.LVTPParams is lvtp.policy.LVTPParams
  assert fused_uncertainty is lvtp.tsallis.fused_uncertainty
  assert old_lowlevel.edge_scores is lvtp.lowlevel.edge_scores
  # The old lvtp module reached its parts as attributes; so does the package.
  assert old_lvtp.tsallis is lvtp.tsallis and old_lvtp.kmeans is lvtp.kmeans
  with pytest.raises(AttributeError, match='no attribute'):
    lvtp_jax.pruning.not_a_policy  # pylint: disable=pointless-statement


def test_importing_the_package_registers_every_policy_without_old_paths():
  code = 'import lvtp_jax.pruning as p; print(",".join(p.names()))'
  # Our deprecation messages start with 'lvtp_jax.pruning.': an error if the
  # package itself reached a policy by its old path.
  run = subprocess.run(
      [sys.executable, '-W', 'error:lvtp_jax.pruning.:DeprecationWarning',
       '-c', code], cwd=REPO, capture_output=True, text=True, check=True)
  assert run.stdout.strip().split(',') == [
      'bat', 'dtop', 'evit', 'gtp', 'lvtp', 'none', 'random', 'random_drop',
      'tome']
