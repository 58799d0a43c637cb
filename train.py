"""Train what a config describes, evaluate it, write WORKDIR/results.json.

  python train.py --config configs/quickstart.py --workdir runs/quickstart
  python train.py --config configs/quickstart_cls.py --workdir runs/qs_cls
  python train.py --config configs/quickstart.py --workdir runs/qs \
      --config.train.lr=3e-4 --restart

A killed run resumes from the latest checkpoint in WORKDIR when started
again with the same config; --restart deletes the checkpoints and starts
over. Any config field can be overridden with --config.<a>.<b>=value.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lvtp_jax.evaluation import results
from lvtp_jax.train import classification
from lvtp_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file (configs/<name>.py[:arg])',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory')
_RESTART = flags.DEFINE_bool(
    'restart', False, 'delete the checkpoints in WORKDIR and start over '
    '(same as --config.train.overwrite=True)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint file at INFO; keep the progress bar legible.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  trainers = {'segmentation': loop.train_and_evaluate,
              'classification': classification.train_and_evaluate}
  if config.task not in trainers:
    raise app.UsageError(f'config.task={config.task!r}: train.py trains '
                         f'{sorted(trainers)} configs.')
  if _RESTART.value:
    with config.unlocked():
      config.train.overwrite = True
  out = trainers[config.task](config, _WORKDIR.value)
  print(results.format_table(out['rows']))
  print(f'wrote {_WORKDIR.value}/results.json')


if __name__ == '__main__':
  app.run(main)
