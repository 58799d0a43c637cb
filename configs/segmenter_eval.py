r"""mIoU, boundary mIoU, FLOPs and throughput of a converted Segmenter.

  python -m lvtp_jax.convert segmenter --checkpoint checkpoint.pth \
      --variant variant.yml --out ckpt/seg_tiny_mask
  python eval.py --config configs/segmenter_eval.py:dataset=ade20k \
      --workdir runs/seg_tiny_mask --config.model.init_from=ckpt/seg_tiny_mask

arg: dataset=ade20k|cityscapes|pascal_context|synthetic_scenes (the official
single-scale protocol of each: short-side resize, sliding windows of the
training crop with stride crop - 32; synthetic_scenes: whole 128 px images),
runlocal (a few images).

Reference (official README, ADE20K val, single scale): Seg-T-Mask/16 38.1,
Seg-S-Mask/16 45.3, Seg-B-Mask/16 48.5 mIoU; not reproduced here (no
ADE20K on the development machine).
"""

import ml_collections

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.evaluation import segmentation

def get_config(arg=None):
  arg = config_args.parse_arg(arg, dataset='ade20k', runlocal=False)
  split, protocol = segmentation.protocol(arg.dataset)
  config = ml_collections.ConfigDict()
  config.task = 'segmentation'
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ''            # converted Segmenter directory
  # Architecture scored by --config.eval.random_weights=True (a converted
  # model brings its own).
  config.model.variant = 'Ti/16'
  config.model.num_classes = 150
  config.model.img_size = 512
  config.model.decoder = 'mask_transformer'
  config.model.decoder_depth = 2
  config.model.aux_layers = ()
  config.model.aux_head = 'linear'
  config.model.normalization = 'vit'
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.pruning = pruning.config_defaults()   # name 'none': unpruned

  config.data = ml_collections.ConfigDict()
  config.data.name = arg.dataset
  config.data.split = split
  config.data.data_dir = ''              # TFDS data_dir ('' = TFDS default)
  config.data.batch_size = 4             # windows (slide) or images (whole)
  config.data.num_examples = 0           # 0 = the whole split

  config.eval = segmentation.config_defaults()
  config.eval.update(protocol)
  config.sweep = ()                      # evaluation settings (one row each)

  if arg.dataset == 'synthetic_scenes':
    from lvtp_jax.data import scene_generator  # pylint: disable=g-import-not-at-top
    config.model.num_classes = scene_generator.NUM_CLASSES
    config.model.img_size = 128
    config.data.batch_size = 16
  if arg.runlocal:
    config.data.num_examples = 8
    config.eval.timing_iters = 1
    config.eval.timing_rounds = 1
  return config
