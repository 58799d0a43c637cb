"""Command line: convert a checkpoint file into a converted lvtp_jax directory.

  python -m lvtp_jax.convert timm --model deit_small_patch16_224 \
      --checkpoint model.safetensors --out ckpt/deit_s16 [--img-size 384]
  python -m lvtp_jax.convert segmenter --checkpoint checkpoint.pth \
      --variant variant.yml --out ckpt/seg_tiny_mask
"""

import argparse
import sys

from lvtp_jax import pretrained
from lvtp_jax.convert import readers
from lvtp_jax.convert import segmenter as seg_convert
from lvtp_jax.convert import timm as timm_lib


def _timm(args) -> None:
  sd = readers.read_checkpoint(args.checkpoint)
  model, params = timm_lib.from_timm(args.model, sd, img_size=args.img_size)
  cfg = timm_lib.model_config(args.model)
  data = dict(cfg['data'], img_size=model.img_size)
  meta = dict(architecture='vit', model=pretrained.module_fields(model), data=data,
              source=dict(kind='timm', model_name=args.model,
                          checkpoint=args.checkpoint))
  pretrained.save(args.out, params, meta, overwrite=args.overwrite)
  print(f'wrote {args.out}: {args.model}, {model.num_classes} classes, '
        f'{model.img_size}px')


def _segmenter(args) -> None:
  sd = readers.read_checkpoint(args.checkpoint)
  variant = seg_convert.read_variant(args.variant)
  model, params = seg_convert.from_segmenter(sd, variant=variant)
  meta = dict(architecture='segmenter', model=pretrained.module_fields(model),
              data=seg_convert.data_config(variant),
              source=dict(kind='segmenter', checkpoint=args.checkpoint,
                          variant=args.variant))
  pretrained.save(args.out, params, meta, overwrite=args.overwrite)
  print(f'wrote {args.out}: Segmenter {model.decoder}, {model.num_classes} '
        f'classes, encoder {model.width}x{model.depth}, crop {model.img_size}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.convert',
                                   description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='source', required=True)
  t = sub.add_parser('timm', help='timm ViT / DeiT state dict')
  t.add_argument('--model', required=True,
                 help='timm model name, e.g. deit_small_patch16_224')
  t.add_argument('--checkpoint', required=True,
                 help='.safetensors, .pth or .bin file')
  t.add_argument('--out', required=True, help='output directory')
  t.add_argument('--img-size', type=int, default=None,
                 help='build for this input size (resamples pos_embed)')
  t.add_argument('--overwrite', action='store_true',
                 help='replace an existing converted directory')
  t.set_defaults(fn=_timm)
  s = sub.add_parser('segmenter', help='official Segmenter checkpoint')
  s.add_argument('--checkpoint', required=True, help='checkpoint.pth')
  s.add_argument('--variant', required=True, help='variant.yml beside it')
  s.add_argument('--out', required=True, help='output directory')
  s.add_argument('--overwrite', action='store_true',
                 help='replace an existing converted directory')
  s.set_defaults(fn=_segmenter)
  args = parser.parse_args(argv)
  if getattr(args, 'img_size', None) is not None and args.img_size <= 0:
    parser.error(f'--img-size {args.img_size}: give a positive input side '
                 '(a multiple of the patch size), or leave it out for the '
                 "model's own.")
  args.fn(args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
