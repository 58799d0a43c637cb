"""Train what a config describes (entry point; the training loop is not built yet).

  python train.py --config configs/<name>.py --workdir DIR

The optax training loop, Orbax checkpoints with resume and multi-device
training are the subject of the training issue (#4). Until it lands this
entry point parses the config like eval.py does and stops with an error that
says so, rather than pretending to train.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file (configs/<name>.py[:arg])',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  raise app.UsageError(
      f'training is not implemented yet (config task {_CONFIG.value.task!r}); '
      'evaluate converted checkpoints with eval.py.')


if __name__ == '__main__':
  app.run(main)
