r"""Quickstart: train a small Segmenter with auxiliary heads on synthetic_scenes.

  python train.py --config configs/quickstart.py --workdir runs/quickstart

Prepares synthetic_scenes (128 px, offline) under the TFDS data_dir if
needed, trains from random initialisation on the CPU, evaluates the final
model on the validation split and writes runs/quickstart/results.json.
Re-running the command resumes from the latest checkpoint; add --restart to
start over.

The pruning policies are compared on the trained model, with no
fine-tuning, by eval.py on the same workdir; each call adds its rows to
runs/quickstart/results.json and draws the Pareto plots and exit maps:

  # unpruned, random, DToP (p0 0.95, 0.9), LVTP-R: masked and buffer mode
  python eval.py --config configs/quickstart.py:sweep=policies \
      --workdir runs/quickstart
  # the LVTP-R ablations (masked mode)
  python eval.py --config configs/quickstart.py:sweep=lvtp_ablation \
      --workdir runs/quickstart
  # each policy's setting chosen on the held-out selection split, then
  # evaluated on validation (lvtp_jax/evaluation/selection.py)
  python -m lvtp_jax.evaluation.selection \
      --config configs/quickstart.py:sweep=selection --workdir runs/quickstart

arg (comma-separated):
  runlocal  a tiny model and a few steps on synthetic_scenes/tiny, for tests
            and a first look (python train.py --config
            configs/quickstart.py:runlocal --workdir /tmp/qs)
  sweep     none (default: one row, config.pruning; what train.py
            evaluates at the end) | policies | lvtp_ablation | selection
            (the grid lvtp_jax.evaluation.selection chooses from on the
            held-out split; lvtp_jax/evaluation/sweeps.py)
"""

import ml_collections

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.data import scene_generator
from lvtp_jax.evaluation import segmentation
from lvtp_jax.evaluation import sweeps
from lvtp_jax.train import optim


def get_config(arg=None):
  arg = config_args.parse_arg(arg, runlocal=False, sweep='none')
  if arg.sweep not in SWEEPS:
    raise ValueError(f'sweep={arg.sweep!r}; known: {sorted(SWEEPS)}.')
  config = ml_collections.ConfigDict()
  config.task = 'segmentation'
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ''          # converted Segmenter to start from
  config.model.random_init = True
  config.model.variant = ''            # e.g. 'Ti/16'; fields below override
  config.model.width = 192
  config.model.depth = 6
  config.model.num_heads = 3
  config.model.mlp_dim = 768
  config.model.patch_size = 16
  config.model.num_classes = scene_generator.NUM_CLASSES
  config.model.img_size = 128
  config.model.decoder = 'linear'
  config.model.decoder_depth = 2
  config.model.aux_layers = (2, 4)     # auxiliary heads after these blocks
  config.model.aux_head = 'linear'
  config.model.posemb = 'learn'        # or 'sincos2d' (fixed; models/posemb.py)
  config.model.normalization = 'vit'
  config.model.drop_path_rate = 0.0
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.pruning = pruning.config_defaults()   # name 'none': unpruned

  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic_scenes'
  config.data.train_split = 'train'
  config.data.split = 'validation'     # evaluation split
  config.data.data_dir = ''            # TFDS data_dir ('' = TFDS default)
  config.data.crop_size = 128
  config.data.ratio_range = (0.5, 2.0)     # random rescale of the image
  config.data.base_scale = ()              # mmseg img_scale (() = own size)
  config.data.cat_max_ratio = 0.75         # crop class-dominance limit (0 off)
  config.data.photometric = True           # photometric distortion
  config.data.batch_size = 16          # evaluation batch
  config.data.num_examples = 0         # evaluation images (0 = all)

  config.train = optim.config_defaults()
  config.train.optimizer = 'adamw'
  config.train.lr = 1e-3
  config.train.warmup_steps = 100
  config.train.num_steps = 2000
  config.train.weight_decay = 0.01
  config.train.grad_clip_norm = 1.0
  config.train.lr_mult = 10.0
  config.train.lr_mult_regex = r'^(decoder|aux_head_\d+)/'
  config.train.batch_size = 16
  config.train.aux_weight = 0.4
  config.train.aux_loss = 'pixel'      # or 'token' (lvtp_jax/train/loop.py)
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.eval_every = 500        # quick validation mIoU (0 = end only)
  config.train.eval_examples = 100     # ... on this many images (0 = all)
  config.train.max_to_keep = 2
  config.train.overwrite = False       # delete old checkpoints (--restart)
  config.train.progress = True
  config.train.num_threads = 2         # data loader threads
  config.train.multi_host = False      # call jax.distributed.initialize()
  config.train.num_devices = 0         # devices of the data mesh (0 = all)

  config.eval = segmentation.config_defaults()
  config.eval.update(dict(mode='whole', size=128, short_size=0, long_max=0,
                          exit_maps=4, timing_iters=10, timing_rounds=9))
  # Evaluation settings, one results row each (dotted overrides of this
  # config); () = one row for the config as it is.
  config.sweep = SWEEPS[arg.sweep]()

  if arg.runlocal:
    config.data.name = 'synthetic_scenes/tiny'
    config.model.width = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.aux_layers = (1,)
    config.data.crop_size = 64
    config.data.batch_size = 8
    config.data.num_examples = 8
    config.train.batch_size = 4
    config.train.warmup_steps = 1
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.eval_every = 2
    config.train.eval_examples = 4
    config.eval.timing_iters = 1
    config.eval.timing_rounds = 1
    config.eval.warmup = 1
    config.eval.exit_maps = 2
    # Three settings keep the test fast: the unpruned model, DToP in masked
    # mode and LVTP with exit summaries in buffer mode calibrated on 8 images.
    # The selection grid keeps one DToP and two LVTP-R settings.
    keep = {'policies': ('unpruned', 'dtop_p0.9', 'lvtp_sum/buffer'),
            'selection': ('dtop_p0.9_sum', 'lvtp_sum_k3',
                          'lvtp_sum_no_edge_lb3')}.get(arg.sweep)
    config.sweep = tuple(
        dict(s, **({'pruning.calibrate.images': 8}
                   if 'pruning.calibrate.images' in s else {}))
        for s in config.sweep
        if keep is None or s['eval.name'] in keep)
  return config


SWEEPS = {'none': tuple, 'policies': sweeps.policy_comparison,
          'lvtp_ablation': sweeps.lvtp_ablation,
          'selection': sweeps.selection_grid}
