"""Every config in configs/ loads, with its args, and names known components."""

import glob
import importlib.util
import os

import ml_collections
import pytest

from lvtp_jax import config_args
from lvtp_jax import pruning
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import segmentation
from lvtp_jax.evaluation import sweeps
from lvtp_jax.models import segmenter as seg_lib
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.train import classification as cls_train
from lvtp_jax.train import model_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _load(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_there_are_configs():
  assert CONFIGS


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_known_components(path):
  mod = _load(path)
  assert 'python eval.py' in mod.__doc__ or 'python train.py' in mod.__doc__
  for arg in (None, 'runlocal'):
    config = mod.get_config(arg)
    assert isinstance(config, ml_collections.ConfigDict)
    if config.task == 'classification':
      if config.model.timm_name:
        arch = timm_convert.model_config(config.model.timm_name)
        model = vit_lib.ViT(num_classes=config.model.num_classes,
                            **arch['model'])
      else:   # the classification test bed's own shape
        model, _, _ = cls_train.build(config.model, 0)
      for setting in sweeps.settings(config):
        pruning.build_spec(setting.pruning, model)
    else:
      assert config.task == 'segmentation'
      assert config.eval.mode in ('whole', 'slide')
      segmentation_datasets.get_dataset(config.data.name)
      # Every evaluation setting is a valid pruning config for the model
      # the config describes (the spec checks layers against aux_layers).
      model = seg_lib.Segmenter(**model_init._random_init_kwargs(  # pylint: disable=protected-access
          config.model), aux_layers=tuple(config.model.aux_layers))
      for setting in segmentation.sweep_settings(config):
        pruning.build_spec(setting.pruning, model,
                           normalization=dict(mean=(0.5,) * 3,
                                              std=(0.5,) * 3))
  with pytest.raises(ValueError, match='unknown config arg'):
    mod.get_config('no_such_arg=1')


@pytest.mark.parametrize('name, sweep', [
    ('quickstart.py', 'policies'), ('quickstart.py', 'lvtp_ablation'),
    ('quickstart.py', 'selection'), ('benchmark_seg.py', 'policies'),
    ('benchmark_seg.py', 'selection'), ('benchmark_seg.py', 'testbed')])
def test_quickstart_sweeps_are_valid_settings(name, sweep):
  mod = _load(os.path.join(REPO, 'configs', name))
  for arg in (f'sweep={sweep}', f'sweep={sweep},runlocal'):
    config = mod.get_config(arg)
    model = seg_lib.Segmenter(**model_init._random_init_kwargs(  # pylint: disable=protected-access
        config.model), aux_layers=tuple(config.model.aux_layers))
    if name == 'benchmark_seg.py' and 'runlocal' not in arg:
      # The test bed of issue 21: 12 blocks, 256 patch tokens, two heads.
      assert (model.depth, (model.img_size // model.patch_size) ** 2,
              model.aux_layers) == (12, 256, (6, 8))
    settings = segmentation.sweep_settings(config)
    names = [s.eval.name for s in settings]
    assert len(set(names)) == len(names) > 0
    for setting in settings:
      pruning.build_spec(setting.pruning, model,
                         normalization=dict(mean=(0.5,) * 3, std=(0.5,) * 3))


@pytest.mark.parametrize('name, arg', [
    ('quickstart_cls.py', 'sweep=policies'),
    ('quickstart_cls.py', 'sweep=policies,runlocal'),
    ('quickstart_cls.py', 'sweep=depth_probe'),
    ('quickstart_cls.py', 'chain=0,sweep=policies'),
    ('quickstart_cls.py', 'finetune=0.6,base=/x/y'),
    ('quickstart_cls.py', 'finetune=0.6,policy=bat,base=/x/y'),
    ('deit_imagenet.py', 'sweep=policies')])
def test_classification_sweeps_are_valid_settings(name, arg):
  config = _load(os.path.join(REPO, 'configs', name)).get_config(arg)
  if config.model.timm_name:
    arch = timm_convert.model_config(config.model.timm_name)
    model = vit_lib.ViT(num_classes=1000, **arch['model'])
  else:
    model, _, _ = cls_train.build(
        ml_collections.ConfigDict(dict(config.model.to_dict(),
                                       init_from='')), 0)
  settings = sweeps.settings(config)
  names = [s.eval.name for s in settings]
  assert len(set(names)) == len(names) > 0
  policies = {s.pruning.name for s in settings}
  if 'sweep=policies,runlocal' in arg:   # the smoke test's short list
    assert policies == {'none', 'evit', 'gtp'}
  elif 'sweep=policies' in arg:
    assert policies == {'none', 'random_drop', 'evit', 'tome', 'bat', 'gtp'}
  elif 'sweep=depth_probe' in arg:
    assert policies == {'none', 'random_drop', 'evit'} and len(names) == 23
  else:
    policy = 'bat' if 'policy=bat' in arg else 'evit'
    assert config.model.init_from == '/x/y' and policies == {policy}
    assert names == [f'{policy}0.6_ft']
  for setting in settings:
    pruning.build_spec(setting.pruning, model)


def test_deit_config_args():
  mod = _load(os.path.join(REPO, 'configs', 'deit_imagenet.py'))
  config = mod.get_config('model=vit_small_patch16_384,dataset=imagenette')
  assert config.model.timm_name == 'vit_small_patch16_384'
  assert config.data.name.startswith('imagenette/')
  with pytest.raises(ValueError, match='dataset'):
    mod.get_config('dataset=cifar10')


def test_parse_arg_types_and_errors():
  a = config_args.parse_arg('n=3,x=0.5,flag,name=abc,off=false',
                            n=1, x=0.1, flag=False, name='', off=True)
  assert (a.n, a.x, a.flag, a.name, a.off) == (3, 0.5, True, 'abc', False)
  with pytest.raises(ValueError, match='expected a bool'):
    config_args.parse_arg('flag=maybe', flag=False)
  with pytest.raises(ValueError, match=r"known: \['n'\]"):
    config_args.parse_arg('m=1', n=1)


def test_segmenter_train_recipes():
  mod = _load(os.path.join(REPO, 'configs', 'segmenter_train.py'))
  for dataset, classes in (('ade20k', 150), ('cityscapes', 19),
                           ('pascal_context', 60)):
    for variant in 'TSBL':
      for decoder in ('linear', 'mask_transformer'):
        for aux in ('none', 'dtop'):
          c = mod.get_config(f'dataset={dataset},variant={variant},'
                             f'decoder={decoder},aux={aux}')
          assert c.model.num_classes == classes
          assert c.model.decoder == decoder
          assert c.model.depth == (24 if variant == 'L' else 12)
          assert c.eval.window == c.data.crop_size == c.model.img_size
          assert c.eval.stride == c.eval.window - 32
          want_aux = ((8, 16) if variant == 'L' else (6, 8)) if aux == 'dtop' \
              else ()
          assert tuple(c.model.aux_layers) == want_aux
          assert c.train.optimizer == 'sgd' and c.train.power == 0.9
  ade = mod.get_config('dataset=ade20k,variant=B')
  assert (ade.train.batch_size, ade.train.lr, ade.train.num_steps,
          ade.data.crop_size) == (8, 1e-3, 160_000, 512)
  assert (ade.eval.window, ade.eval.stride) == (512, 480)
  large = mod.get_config('dataset=ade20k,variant=L')
  assert (large.data.crop_size, large.eval.window, large.eval.stride,
          large.eval.short_size) == (640, 640, 608, 640)
  pc = mod.get_config('dataset=pascal_context')
  assert (pc.train.batch_size, pc.data.crop_size, pc.train.num_steps) == (
      16, 480, 80_000)
  city = mod.get_config('dataset=cityscapes')
  assert (city.train.lr, city.data.crop_size) == (1e-2, 768)
  with pytest.raises(ValueError, match='variant'):
    mod.get_config('variant=H')
  # DToP phase 2: the pruning fine-tune of specs/dtop.md §4.
  two = mod.get_config('variant=B,aux=dtop,phase=2')
  assert (two.pruning.name, two.pruning.dtop.threshold,
          two.pruning.dtop.top_k, two.pruning.mode) == ('dtop', 0.9, 5,
                                                        'masked')
  assert (two.train.optimizer, two.train.lr, two.train.num_steps,
          two.train.warmup_steps, two.train.grad_clip_norm,
          two.train.lr_mult) == ('adamw', 2e-5, 40_000, 1500, 35.0, 10.0)
  assert mod.get_config('variant=L,aux=dtop,phase=2').pruning.dtop.threshold \
      == 0.95
  with pytest.raises(ValueError, match='phase=2'):
    mod.get_config('phase=2')
  names = [s['eval.name'] for s in mod.get_config(
      'aux=dtop,sweep=policies').sweep]
  assert names[0] == 'unpruned' and 'lvtp/buffer' in names
  assert len(set(names)) == len(names)


def test_benchmark_seg_scenes_and_posemb_args():
  mod = _load(os.path.join(REPO, 'configs', 'benchmark_seg.py'))
  config = mod.get_config('scenes=paths,posemb=sincos2d')
  assert config.data.name == 'synthetic_scenes/paths'
  assert config.train.num_steps == 3000
  model = seg_lib.Segmenter(**model_init._random_init_kwargs(  # pylint: disable=protected-access
      config.model), aux_layers=tuple(config.model.aux_layers))
  assert model.posemb == 'sincos2d'
  assert mod.get_config().model.posemb == 'learn'   # the default
  short = mod.get_config('scenes=paths_short')
  assert (short.data.name, short.train.num_steps) == (
      'synthetic_scenes/paths_short', 3300)
  dense = mod.get_config('scenes=paths_dense')
  assert (dense.data.name, dense.train.num_steps) == (
      'synthetic_scenes/paths_dense', 3200)
  with pytest.raises(ValueError, match="posemb='rope'"):
    mod.get_config('posemb=rope')
  with pytest.raises(ValueError, match="scenes='lines'"):
    mod.get_config('scenes=lines')
