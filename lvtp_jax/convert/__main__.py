"""Command line: convert a checkpoint file into a converted lvtp_jax directory.

  python -m lvtp_jax.convert timm --model deit_small_patch16_224 \
      --checkpoint model.safetensors --out ckpt/deit_s16 [--img-size 384]
"""

import argparse
import dataclasses
import sys

from lvtp_jax import pretrained
from lvtp_jax.convert import readers
from lvtp_jax.convert import timm as timm_lib


def _timm(args) -> None:
  sd = readers.read_checkpoint(args.checkpoint)
  model, params = timm_lib.from_timm(args.model, sd, img_size=args.img_size)
  cfg = timm_lib.model_config(args.model)
  data = dict(cfg['data'], img_size=model.img_size)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ('parent', 'name')}
  fields.pop('dtype')
  meta = dict(architecture='vit', model=fields, data=data,
              source=dict(kind='timm', model_name=args.model,
                          checkpoint=args.checkpoint))
  pretrained.save(args.out, params, meta, overwrite=args.overwrite)
  print(f'wrote {args.out}: {args.model}, {model.num_classes} classes, '
        f'{model.img_size}px')


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
  args = parser.parse_args(argv)
  args.fn(args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
