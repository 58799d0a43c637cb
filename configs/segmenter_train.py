r"""Segmenter on ADE20K, Cityscapes or Pascal Context: the official recipe.

  python -m lvtp_jax.data.prepare ade20k --manual_dir ~/downloads
  python -m lvtp_jax.convert timm --model vit_small_patch16_384 \
      --checkpoint vit_small_patch16_384.safetensors --out ckpt/vit_s16_384
  python train.py --config configs/segmenter_train.py:dataset=ade20k,variant=S \
      --workdir runs/seg_s_mask_ade20k --config.model.init_from=ckpt/vit_s16_384
  python eval.py --config configs/segmenter_train.py:dataset=ade20k,variant=S \
      --workdir runs/seg_s_mask_ade20k

The same run with the auxiliary heads DToP and LVTP prune with (phase 1 of
their recipe): add aux=dtop to the arg. Then

  # LVTP-R and DToP without fine-tuning, on the phase-1 checkpoint:
  python eval.py --config configs/segmenter_train.py:aux=dtop,sweep=policies \
      --workdir runs/seg_s_ade_aux
  # DToP phase 2 (pruning fine-tune, decisions live), from phase 1:
  python train.py --config configs/segmenter_train.py:aux=dtop,phase=2 \
      --workdir runs/seg_s_ade_dtop --config.model.init_from=runs/seg_s_ade_aux

arg (comma-separated key=value):
  dataset  ade20k (default) | cityscapes | pascal_context
  variant  T | S (default) | B | L: ViT-Ti/S/B/L with patch 16; init_from is
           the converted ImageNet backbone the official code starts from
           (vit_{tiny,small,base,large}_patch16_384, AugReg) or a converted
           Segmenter or another run's workdir
  decoder  mask_transformer (default) | linear
  aux      none (default) | dtop: per-token linear auxiliary heads after
           blocks 6 and 8 (12-block models) or 8 and 16 (ViT-L), each with
           token cross-entropy weight 1.0 (the DToP configs weight every
           head 1.0)
  phase    1 (default) | 2: DToP's pruning fine-tune (specs/dtop.md §4):
           config.pruning = dtop (p0 0.9, or 0.95 for ViT-L; top-k 5,
           masked mode), AdamW lr 2e-5 (heads x10), weight decay 0.01,
           gradient clip 35, 1500 warm-up steps, poly 0.9, 40k iterations;
           init_from is the phase-1 workdir. Needs aux=dtop.
  sweep    none (default: one row, config.pruning) | policies (unpruned,
           random, DToP, LVTP-R; lvtp_jax.evaluation.sweeps) |
           lvtp_ablation
  runlocal a few steps on synthetic_scenes/tiny with a tiny random model

Recipe (official segm/config.yml and train.py defaults, spec
weights_and_data.md §2.7): SGD momentum 0.9, no weight decay, poly decay
power 0.9 to 1e-5 without warm-up, encoder drop-path 0.1, cross-entropy
with ignore 255, mmseg augmentation (random rescale 0.5-2.0 of the
dataset's img_scale, crop with cat_max_ratio 0.75, flip, photometric).
Per dataset (official epochs converted to iterations at the official
batch):
  ADE20K          batch 8,  lr 1e-3, crop 512 (ViT-L: 640), 160k iterations
  Pascal Context  batch 16, lr 1e-3, crop 480, 80k (256 epochs of 4,998)
  Cityscapes      batch 8,  lr 1e-2, crop 768, 80k (216 epochs of 2,975)
Evaluation: the official single-scale sliding-window protocol
(lvtp_jax.evaluation.segmentation.PROTOCOLS).
"""

import ml_collections

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import segmentation
from lvtp_jax.evaluation import sweeps
from lvtp_jax.train import optim

# dataset -> (batch, lr, crop, iterations, mmseg img_scale (long, short)).
RECIPES = {
    'ade20k': (8, 1e-3, 512, 160_000, (2048, 512)),
    'pascal_context': (16, 1e-3, 480, 80_000, (520, 520)),
    'cityscapes': (8, 1e-2, 768, 80_000, (2048, 1024)),
}
# variant -> (width, depth, heads): ViT-Ti/S/B/L.
VARIANTS = {'T': (192, 12, 3), 'S': (384, 12, 6), 'B': (768, 12, 12),
            'L': (1024, 24, 16)}
AUX_LAYERS = {12: (6, 8), 24: (8, 16)}
SWEEPS = {'none': tuple, 'policies': sweeps.policy_comparison,
          'lvtp_ablation': sweeps.lvtp_ablation}


def get_config(arg=None):
  arg = config_args.parse_arg(arg, dataset='ade20k', variant='S',
                              decoder='mask_transformer', aux='none',
                              phase=1, sweep='none', runlocal=False)
  if arg.dataset not in RECIPES:
    raise ValueError(f'dataset={arg.dataset!r}; known: {sorted(RECIPES)}.')
  if arg.variant not in VARIANTS:
    raise ValueError(f'variant={arg.variant!r}; known: {sorted(VARIANTS)}.')
  if arg.aux not in ('none', 'dtop'):
    raise ValueError(f'aux={arg.aux!r}; expected none or dtop.')
  if arg.phase not in (1, 2) or (arg.phase == 2 and arg.aux != 'dtop'):
    raise ValueError(f'phase={arg.phase}: 1, or 2 (the DToP pruning '
                     'fine-tune) together with aux=dtop.')
  if arg.sweep not in SWEEPS:
    raise ValueError(f'sweep={arg.sweep!r}; known: {sorted(SWEEPS)}.')
  batch, lr, crop, steps, img_scale = RECIPES[arg.dataset]
  width, depth, heads = VARIANTS[arg.variant]
  if arg.dataset == 'ade20k' and arg.variant == 'L':
    crop, img_scale = 640, (2560, 640)

  config = ml_collections.ConfigDict()
  config.task = 'segmentation'
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ''          # converted backbone / Segmenter / run
  config.model.random_init = False     # from scratch (the paper: 12.5 mIoU)
  config.model.variant = ''
  config.model.width = width
  config.model.depth = depth
  config.model.num_heads = heads
  config.model.mlp_dim = 4 * width
  config.model.patch_size = 16
  config.model.num_classes = segmentation_datasets.get_dataset(
      arg.dataset).num_classes
  config.model.img_size = crop
  config.model.decoder = arg.decoder
  config.model.decoder_depth = 2
  config.model.aux_layers = AUX_LAYERS[depth] if arg.aux == 'dtop' else ()
  config.model.aux_head = 'linear'
  config.model.normalization = 'vit'   # random init only; else the source's
  config.model.drop_path_rate = 0.1
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.pruning = pruning.config_defaults()   # name 'none': unpruned

  config.data = ml_collections.ConfigDict()
  config.data.name = arg.dataset
  config.data.train_split = 'train'
  config.data.data_dir = ''            # TFDS data_dir ('' = TFDS default)
  config.data.crop_size = crop
  config.data.ratio_range = (0.5, 2.0)
  config.data.base_scale = img_scale
  config.data.cat_max_ratio = 0.75
  config.data.photometric = True
  config.data.batch_size = 4           # evaluation windows per forward
  config.data.num_examples = 0         # evaluation images (0 = all)

  config.train = optim.config_defaults()
  config.train.update(dict(
      optimizer='sgd', lr=lr, end_lr=1e-5, power=0.9, warmup_steps=0,
      num_steps=steps, momentum=0.9, weight_decay=0.0, grad_clip_norm=0.0))
  config.train.batch_size = batch
  config.train.aux_weight = 1.0
  config.train.aux_loss = 'pixel'      # or 'token' (lvtp_jax/train/loop.py)
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.max_to_keep = 3
  config.train.eval_every = 16_000
  config.train.eval_examples = 200
  config.train.overwrite = False
  config.train.progress = True
  config.train.num_threads = 8
  config.train.multi_host = False
  config.train.num_devices = 0

  split, protocol = segmentation.protocol(arg.dataset, crop=crop)
  config.data.split = split
  config.eval = segmentation.config_defaults()
  config.eval.update(protocol)
  config.sweep = SWEEPS[arg.sweep]()

  if arg.phase == 2:
    config.pruning.name = 'dtop'
    config.pruning.dtop.threshold = 0.95 if arg.variant == 'L' else 0.9
    config.train.update(dict(
        optimizer='adamw', lr=2e-5, end_lr=0.0, power=0.9, warmup_steps=1500,
        num_steps=40_000, weight_decay=0.01, grad_clip_norm=35.0,
        lr_mult=10.0, lr_mult_regex=r'^(decoder|aux_head_\d+)/'))

  if arg.runlocal:
    from lvtp_jax.data import scene_generator  # pylint: disable=g-import-not-at-top
    config.model.random_init = True
    config.model.update(dict(width=32, depth=4, num_heads=2, mlp_dim=64,
                             num_classes=scene_generator.NUM_CLASSES,
                             img_size=64))
    if arg.aux == 'dtop':
      config.model.aux_layers = (1, 2)
    config.data.update(dict(name='synthetic_scenes/tiny', crop_size=64,
                            base_scale=(), split='validation',
                            num_examples=4))
    config.train.update(dict(batch_size=2, num_steps=2, log_every=1,
                             checkpoint_every=2, eval_every=0,
                             num_threads=0, warmup_steps=0))
    config.eval.update(dict(mode='slide', short_size=128, long_max=128,
                            window=64, stride=32, timing_iters=1,
                            timing_rounds=1, warmup=1))
  return config
