r"""Classification test bed: a 12-block DeiT-style ViT on synthetic_objects.

  python train.py --config configs/quickstart_cls.py --workdir runs/quickstart_cls

Trains from random initialisation on the CPU (built-in, offline images:
lvtp_jax/data/synthetic_objects.py, the lookup task: key-value cards among
clutter and one checkered marker; the label is the value on the card whose
key is the marker's colour), evaluates the unpruned model on the 2000 validation
images and writes runs/quickstart_cls/results.json. Twelve blocks, so
that EViT's reduction layers 4/7/10 mean what they mean on DeiT; 64 x 64
images at patch size 8: 64 patch tokens. Re-running resumes; --restart
starts over.

Every in-block reduction off the shelf (none, the random baseline at
EViT's token counts, EViT at keep rates 0.9-0.5, ToMe at r 1-4, BAT at
keep rates 0.9/0.7/0.5), in buffer
mode, with the top-1 vs GFLOPs plot and token maps:

  python eval.py --config configs/quickstart_cls.py:sweep=policies \
      --workdir runs/quickstart_cls

EViT's own protocol, a fine-tune with the policy active from the trained
model (spec classification_policies.md §2.2), then the same sweep row:

  python train.py --config configs/quickstart_cls.py:finetune=0.7 \
      --workdir runs/quickstart_cls_evit0.7

arg (comma-separated):
  runlocal  a tiny model, a few steps, a few images (tests, a first look)
  sweep     none (default: one row, config.pruning) | policies |
            depth_probe (75% of the tokens dropped, randomly or by EViT's
            score, inside one block L, for each L: when does the model know?)
  finetune  keep rate to fine-tune with (0: no fine-tune, default)
  policy    the policy of the fine-tune: evit (default) or bat
  base      the trained run a fine-tune starts from (runs/quickstart_cls)
  chain     1 (default): the lookup task, one lookup from the checkered
            marker; D > 1: D lookups in a row; 0: the earlier colour task
            (the label is the colour of the checkered disc among plain
            ones; the model reads it in block 1, so no reduction at block
            4 or later changes its answer: docs/quickstart_cls.md)
"""

import dataclasses

import ml_collections

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.data import synthetic_objects
from lvtp_jax.evaluation import sweeps
from lvtp_jax.train import optim


def get_config(arg=None):
  arg = config_args.parse_arg(arg, runlocal=False, sweep='none',
                              finetune=0.0, policy='evit',
                              base='runs/quickstart_cls', chain=1)
  if arg.policy not in ('evit', 'bat'):
    raise ValueError(f'policy={arg.policy!r}: fine-tune with evit or bat.')
  if arg.sweep not in SWEEPS:
    raise ValueError(f'sweep={arg.sweep!r}; known: {sorted(SWEEPS)}.')
  if not 0.0 <= arg.finetune < 1.0:
    raise ValueError(f'finetune={arg.finetune}: an EViT keep rate in (0, 1), '
                     'or 0 for no fine-tune.')
  if arg.chain < 0:
    raise ValueError(f'chain={arg.chain}: the number of lookups (1: the '
                     'test bed), or 0 for the colour task.')
  config = ml_collections.ConfigDict()
  config.task = 'classification'
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ''          # a train.py workdir or converted ViT
  config.model.random_init = True
  config.model.timm_name = ''          # '' = the shape below
  config.model.width = 64
  config.model.depth = 12
  config.model.num_heads = 2
  config.model.mlp_dim = 256
  config.model.patch_size = 8
  config.model.img_size = 64
  config.model.num_classes = synthetic_objects.NUM_CLASSES
  config.model.drop_path_rate = 0.0
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.pruning = pruning.config_defaults()   # name 'none': unpruned

  config.data = ml_collections.ConfigDict()
  config.data.name = synthetic_objects.NAME
  config.data.train_split = 'train'
  config.data.split = 'validation'     # evaluation split ('selection': held out)
  config.data.data_dir = ''            # unused: the images are generated
  config.data.batch_size = 250         # evaluation batch
  config.data.num_examples = 0         # evaluation images (0 = all 2000)
  config.data.num_threads = 2
  # synthetic_objects.Difficulty: size, distractors, radius, hue_jitter,
  # noise, lines, contrast, check (lvtp_jax/data/synthetic_objects.py).
  config.data.difficulty = ml_collections.ConfigDict(
      dataclasses.asdict(synthetic_objects.Difficulty()))
  if arg.chain:                        # the lookup task (see the module)
    config.data.difficulty.chain = arg.chain
    config.data.difficulty.cell = config.model.patch_size
    # Lookups compare colours: half the colour task's hue jitter, so that
    # few colours cross into a neighbouring class (0.1 apart).
    config.data.difficulty.hue_jitter = 0.015

  config.train = optim.config_defaults()
  config.train.optimizer = 'adamw'
  config.train.lr = 1e-3
  config.train.end_lr = 1e-5
  config.train.power = 1.0
  config.train.warmup_steps = 50
  config.train.num_steps = 1200
  config.train.weight_decay = 0.05
  config.train.grad_clip_norm = 1.0
  config.train.batch_size = 64
  config.train.label_smoothing = 0.0
  config.train.log_every = 25
  config.train.checkpoint_every = 200
  config.train.eval_every = 200        # quick validation top-1 (0 = end only)
  config.train.eval_examples = 500     # ... on this many images (0 = all)
  config.train.max_to_keep = 2
  config.train.overwrite = False       # delete old checkpoints (--restart)
  config.train.progress = True
  config.train.num_threads = 2         # image generator threads
  config.train.multi_host = False
  config.train.num_devices = 0

  config.eval = ml_collections.ConfigDict()
  config.eval.name = ''                # row name ('' = the policy name)
  config.eval.progress = True
  config.eval.warmup = 2
  config.eval.timing_iters = 5
  config.eval.timing_rounds = 5
  config.eval.token_maps = 6           # images whose token maps are drawn
  config.eval.in_plots = True          # False: the row stays off the plots
  config.eval.family = ''              # plot/selection group ('' = policy)
  config.eval.random_weights = False   # score random weights when there is
                                       # no checkpoint (never implied)

  config.sweep = SWEEPS[arg.sweep]()

  if arg.finetune:
    config.model.init_from = arg.base
    config.pruning.name = arg.policy
    config.pruning.mode = 'buffer'
    config.pruning[arg.policy].keep_rate = arg.finetune
    config.train.lr = 2e-4
    config.train.warmup_steps = 10
    config.train.num_steps = 200
    config.eval.name = f'{arg.policy}{arg.finetune:g}_ft'
    config.eval.family = f'{arg.policy} (fine-tuned)'

  if arg.runlocal:
    config.model.width = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.data.batch_size = 8
    config.data.num_examples = 16
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.num_steps = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.eval_every = 2
    config.train.eval_examples = 8
    config.eval.warmup = 1
    config.eval.timing_iters = 1
    config.eval.timing_rounds = 1
    config.eval.token_maps = 2
    if arg.sweep in ('policies', 'depth_probe'):
      keep = ('none', 'evit0.7', 'gtp_P3', 'random0.25@1', 'evit0.25@4')
      config.sweep = tuple(s for s in config.sweep if s['eval.name'] in keep)
  return config


SWEEPS = {'none': tuple, 'policies': sweeps.classification_policies,
          'depth_probe': sweeps.depth_probe}
