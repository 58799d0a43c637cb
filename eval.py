"""Evaluate what a config describes and write WORKDIR/results.json.

  python eval.py --config configs/quickstart.py --workdir runs/quickstart
  python eval.py --config configs/deit_imagenet.py --workdir /tmp/deit_s16 \
      --config.model.init_from=ckpt/deit_s16
  python eval.py --config configs/segmenter_eval.py:dataset=ade20k \
      --workdir /tmp/seg_tiny --config.model.init_from=ckpt/seg_tiny_mask

WORKDIR's latest training checkpoint is evaluated when there is one (a
train.py run with the same config), else config.model.init_from.
Every setting of config.sweep (a list of overrides) gives one row; the rows
are added to WORKDIR/results.json (a row of the same name is replaced), and
the Pareto plots and exit maps are drawn next to it
(lvtp_jax/evaluation/plots.py). Any config field can be overridden with
--config.<a>.<b>=value.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lvtp_jax.evaluation import classification
from lvtp_jax.evaluation import plots
from lvtp_jax.evaluation import results
from lvtp_jax.evaluation import segmentation

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file (configs/<name>.py[:arg])',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'directory that receives results.json')
flags.mark_flags_as_required(['config', 'workdir'])

_TASKS = ('classification', 'segmentation')


def run(config, workdir: str):
  """Evaluates `config`, adds its rows to WORKDIR/results.json (rows of the
  same name are replaced) and draws the figures; returns the file's content."""
  if config.task not in _TASKS:
    raise ValueError(f'config.task={config.task!r} has no evaluator; known: '
                     f'{sorted(_TASKS)}.')
  if config.task == 'segmentation':
    rows, visuals = segmentation.evaluate(config, workdir)
  else:
    rows, visuals = classification.evaluate(config, workdir)
  out = results.write(workdir, rows, merge=True)
  plots.write_figures(workdir, out['rows'], visuals)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # TFDS and Orbax log every dataset and checkpoint open at INFO.
    logging.set_verbosity(logging.WARNING)
  out = run(_CONFIG.value, _WORKDIR.value)
  print(f'device: {out["device"]}')
  print(results.format_table(out['rows']))
  print(f'wrote {_WORKDIR.value}/results.json')


if __name__ == '__main__':
  app.run(main)
