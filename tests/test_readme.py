"""Every command README.md and docs/*.md give for train.py, eval.py or
`python -m lvtp_jax...` parses, without running it.

The commands are read from the fenced shell blocks of the documents
(continuation lines joined, `&&` chains and `VAR=value` prefixes split off,
`#` comments dropped). Each one is then parsed the way its program parses
it, and stopped before it does any work:

- `train.py`, `eval.py` and the absl modules (selection, paired, loss_split):
  the script runs as `__main__` with its flags defined on a fresh
  `absl.flags.FlagValues` and `app.run` replaced by the parse alone. So
  `--config path[:arg]` is loaded by ml_collections' own loader
  (`get_config(arg)`, which checks the arg against the config's known keys),
  every `--config.a.b=v` must name an existing field and parse as its type,
  and every other flag must be one the program defines.
- argparse modules (convert, bench, data.prepare, ...): the module runs as
  `__main__` with `ArgumentParser.parse_args` stopping right after the real
  parse, so unknown flags, missing required ones, bad choices and bad types
  fail as they would on the command line.

Commands that need data, weights or a GPU are parse-checked all the same:
no file the command names (a checkpoint, a results.json) has to exist,
except the config file.
"""

import functools
import glob
import importlib
import importlib.util
import inspect
import os
import re
import runpy
import shlex
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(REPO, 'README.md')] + sorted(
    glob.glob(os.path.join(REPO, 'docs', '*.md')))
_SHELL = ('', 'sh', 'bash', 'shell', 'console')
_SCRIPTS = ('train.py', 'eval.py')


def _blocks(text):
  """The contents of the fenced shell code blocks of a markdown text."""
  for lang, body in re.findall(r'^```([\w-]*)\n(.*?)^```', text, re.M | re.S):
    if lang in _SHELL:
      yield body


def _commands(block):
  """[argv] of every `python train.py|eval.py` / `python -m lvtp_jax...`."""
  for line in block.replace('\\\n', ' ').splitlines():
    if not re.search(r'(^|&&|;)\s*([A-Za-z_]\w*=\S*\s+)*python3?\s', line):
      continue   # not a command line (prose or a layout listing)
    words = shlex.split(line, comments=True)
    segment = []
    for word in words + ['&&']:
      if word not in ('&&', '||', ';', '|'):
        segment.append(word)
        continue
      while segment and re.fullmatch(r'[A-Za-z_]\w*=.*', segment[0]):
        segment.pop(0)   # VAR=value prefixes
      if segment and segment[0] in ('python', 'python3') and len(segment) > 1:
        if segment[1] in _SCRIPTS:
          yield segment[1:]
        elif (segment[1] == '-m' and len(segment) > 2
              and segment[2].split('.')[0] == 'lvtp_jax'):
          yield segment[1:]
      segment = []


def _documented():
  out = []
  for path in DOCUMENTS:
    with open(path) as f:
      text = f.read()
    for block in _blocks(text):
      for argv in _commands(block):
        out.append(pytest.param(argv, id=f'{os.path.relpath(path, REPO)}: '
                                f'{shlex.join(argv)[:120]}'))
  return out


COMMANDS = _documented()


class _Parsed(Exception):
  """Raised in place of running a program, once its arguments parsed."""


def _script(argv):
  """(path of the program that runs, argv[0] for it)."""
  if argv[0] in _SCRIPTS:
    return os.path.join(REPO, argv[0]), argv[0]
  module = argv[1]
  importlib.import_module(module)   # importable, with its dependencies
  spec = importlib.util.find_spec(module)
  if spec.submodule_search_locations is not None:   # a package: its __main__
    importlib.import_module(module + '.__main__')
    spec = importlib.util.find_spec(module + '.__main__')
  return spec.origin, module


def _bind(monkeypatch, module, flag_values):
  """Makes every function of `module` whose flag_values defaults to the
  global absl.flags.FLAGS default to `flag_values` instead."""
  for name, fn in list(vars(module).items()):
    if not inspect.isfunction(fn):
      continue
    signature = inspect.signature(fn)
    if 'flag_values' not in signature.parameters:
      continue

    def bound(*args, fn=fn, signature=signature, **kwargs):
      if 'flag_values' not in signature.bind_partial(*args, **kwargs).arguments:
        kwargs['flag_values'] = flag_values
      return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, functools.wraps(fn)(bound))


def test_the_documents_give_commands():
  scripts = {argv[0] if argv[0] in _SCRIPTS else argv[1]
             for argv in (p.values[0] for p in COMMANDS)}
  # The README's main jobs are among them (the extraction did not break).
  assert {'train.py', 'eval.py', 'lvtp_jax.convert',
          'lvtp_jax.bench.suite'} <= scripts, scripts


@pytest.mark.parametrize('argv', COMMANDS)
def test_documented_command_parses(argv, monkeypatch, capsys):
  monkeypatch.chdir(REPO)   # the documents' paths are relative to the root
  if '--config' in argv:
    config = argv[argv.index('--config') + 1]
    assert os.path.isfile(config.split(':')[0]), f'no config file {config}'
  path, prog = _script(argv)
  words = argv[1:] if argv[0] in _SCRIPTS else argv[2:]
  monkeypatch.setattr(sys, 'argv', [prog] + words)

  fresh = flags.FlagValues()
  _bind(monkeypatch, flags, fresh)
  _bind(monkeypatch, config_flags, fresh)

  def parse_only(main, argv=None, **unused_kwargs):
    del main, argv
    fresh(sys.argv)
    raise _Parsed()
  monkeypatch.setattr(app, 'run', parse_only)

  real_parse_args = __import__('argparse').ArgumentParser.parse_args

  def parse_args_only(self, args=None, namespace=None):
    real_parse_args(self, args, namespace)
    raise _Parsed()
  monkeypatch.setattr('argparse.ArgumentParser.parse_args', parse_args_only)

  try:
    runpy.run_path(path, run_name='__main__')
  except _Parsed:
    pass
  except SystemExit as e:   # argparse's error exit
    pytest.fail(f'{shlex.join(argv)}: exit {e.code}\n'
                f'{capsys.readouterr().err[-2000:]}')
  else:
    pytest.fail(f'{shlex.join(argv)}: {path} returned without parsing its '
                'arguments through absl or argparse')
  if 'config' in fresh:
    assert isinstance(fresh['config'].value, ml_collections.ConfigDict)
