r"""Top-1, FLOPs and throughput of a converted timm DeiT / ViT classifier.

Convert the timm weights once, then evaluate:

  python -m lvtp_jax.convert timm --model deit_small_patch16_224 \
      --checkpoint deit_small_patch16_224.safetensors --out ckpt/deit_s16
  python eval.py --config configs/deit_imagenet.py --workdir runs/deit_s16 \
      --config.model.init_from=ckpt/deit_s16

arg (after ':'): model=<timm name> (default deit_small_patch16_224),
dataset=imagenet2012|imagenette (imagenette maps its 10 labels onto the
1000-class head), runlocal (64 images, small batches), sweep=none|policies
(policies: unpruned, random, EViT 0.7/0.6/0.5, ToMe r 8/13/16, BAT
0.7/0.6/0.5, one row each,
and the top-1 vs GFLOPs plot):

  python eval.py --config configs/deit_imagenet.py:sweep=policies \
      --workdir runs/deit_s16 --config.model.init_from=ckpt/deit_s16

Reference: timm reports 79.856 top-1 for deit_small_patch16_224.fb_in1k on
imagenet2012 validation (timm results-imagenet.csv); not yet reproduced here
(no ImageNet on the development machine).
"""

import ml_collections

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.evaluation import sweeps

DATASETS = {
    'imagenet2012': ('imagenet2012', 'validation'),
    'imagenette': ('imagenette/320px-v2', 'validation'),
}


def get_config(arg=None):
  arg = config_args.parse_arg(arg, model='deit_small_patch16_224',
                              dataset='imagenet2012', runlocal=False,
                              sweep='none')
  if arg.sweep not in SWEEPS:
    raise ValueError(f'sweep={arg.sweep!r}; known: {sorted(SWEEPS)}.')
  if arg.dataset not in DATASETS:
    raise ValueError(f'dataset={arg.dataset!r}; known: {sorted(DATASETS)}.')
  config = ml_collections.ConfigDict()
  config.task = 'classification'
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ''          # converted directory (lvtp_jax.convert)
  config.model.timm_name = arg.model   # architecture of eval.random_weights
  config.model.num_classes = 1000      # head size with eval.random_weights
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.pruning = pruning.config_defaults()   # name 'none': unpruned

  config.data = ml_collections.ConfigDict()
  config.data.name, config.data.split = DATASETS[arg.dataset]
  config.data.data_dir = ''            # TFDS data_dir ('' = TFDS default)
  config.data.batch_size = 64
  config.data.num_examples = 0         # 0 = the whole split
  config.data.num_threads = 4          # preprocessing threads

  config.eval = ml_collections.ConfigDict()
  config.eval.name = ''                # row name ('' = the policy name)
  config.eval.progress = True          # progress bar on stderr
  config.eval.warmup = 2               # untimed calls before timing
  config.eval.timing_iters = 5         # calls per timing round
  config.eval.timing_rounds = 3        # rounds; the median is reported
  config.eval.token_maps = 0           # images whose token maps are drawn
  config.eval.in_plots = True          # False: the row stays off the plots
  config.eval.family = ''              # plot/selection group ('' = policy)
  config.eval.random_weights = False   # score random weights (smoke tests,
                                       # speed) when init_from is empty

  # Evaluation settings, one results row each (dotted overrides of this
  # config); () = one row for the config as it is.
  config.sweep = SWEEPS[arg.sweep]()

  if arg.runlocal:
    config.data.batch_size = 8
    config.data.num_examples = 64
    config.eval.timing_iters = 2
  return config


# sweep=policies: the papers' comparison on DeiT-S (spec
# classification_policies.md): ToMe r 8/13/16, EViT keep rates 0.7/0.6/0.5,
# the random baseline at EViT 0.7's token counts, BAT 0.7/0.6/0.5 (off the
# shelf: BAT's own numbers are trained with it), GTP P 4/8/13 with its
# defaults and with the official README's settings, unpruned; buffer mode.
SWEEPS = {'none': tuple,
          'policies': lambda: sweeps.classification_policies(
              keep_rates=(0.7, 0.6, 0.5), tome_rs=(8, 13, 16),
              random_rates=(0.7,), bat_rates=(0.7, 0.6, 0.5),
              gtp_props=(4, 8, 13), maps=())}
