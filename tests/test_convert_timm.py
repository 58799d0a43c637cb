"""Parity with live timm models, strict conversion errors, readers and CLI.

The reference is timm itself (pretrained=False, so nothing is downloaded).
Every parameter is perturbed away from its default initialisation so that a
swapped or mis-transposed tensor cannot hide behind ones, zeros or symmetric
init. Limit: max |logits difference| <= 1e-4 x max |logits|, float32.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from lvtp_jax import pretrained
from lvtp_jax.convert import __main__ as convert_cli
from lvtp_jax.convert import readers
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.convert import from_timm

REL_TOL = 1e-4


def perturbed_timm(name, seed=0, **kw):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, **kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      # Distinct values everywhere: LayerNorm scales away from 1, biases and
      # tokens away from 0, by an amount relative to each tensor's spread.
      spread = max(float(p.std()) if p.numel() > 1 else 0.0, 0.05)
      p.add_(torch.randn_like(p) * spread * 0.5)
  return model


def timm_logits(model, x_nhwc):
  with torch.inference_mode():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def ours_logits(model, params, x_nhwc):
  return np.asarray(jax.jit(model.apply)({'params': params},
                                         jnp.asarray(x_nhwc)))


def images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (n, size, size, 3)).astype(np.float32)


def assert_close(ours, ref):
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= REL_TOL * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.mark.parametrize('name', [
    'deit_tiny_patch16_224',
    'deit_small_patch16_224',
    'deit_base_patch16_224',
    'deit_small_distilled_patch16_224',
    'vit_small_patch16_224',
    'vit_tiny_patch16_384',
    'vit_small_patch32_224',
])
def test_logits_match_timm(name):
  ref = perturbed_timm(name)
  size = ref.default_cfg['input_size'][-1]
  model, params = from_timm(name, ref.state_dict())
  x = images(2, size)
  assert_close(ours_logits(model, params, x), timm_logits(ref, x))


@pytest.mark.parametrize('name, src_size, dst_size', [
    ('deit_small_patch16_224', 224, 384),   # up-sampling the grid
    ('deit_tiny_distilled_patch16_224', 224, 160),  # down: antialias matters
])
def test_resampled_pos_embed_matches_timm_loader(name, src_size, dst_size):
  src = perturbed_timm(name)
  sd = src.state_dict()
  # timm's own path: a model built for the new size loads the old weights
  # through checkpoint_filter_fn, which resamples pos_embed.
  dst = timm.create_model(name, pretrained=False, img_size=dst_size).eval()
  module = __import__(type(dst).__module__, fromlist=['checkpoint_filter_fn'])
  dst.load_state_dict(module.checkpoint_filter_fn(dict(sd), dst))
  model, params = from_timm(name, sd, img_size=dst_size)
  assert model.img_size == dst_size
  np.testing.assert_allclose(np.asarray(params['pos_embed']),
                             dst.pos_embed.detach().numpy(), atol=2e-6)
  x = images(2, dst_size, seed=1)
  assert_close(ours_logits(model, params, x), timm_logits(dst, x))


def _timm_shapes(name):
  """Flax path -> shape of every parameter of timm's `name` (meta device)."""
  ref = timm_convert._meta_model(timm, torch, name)  # pylint: disable=protected-access
  shapes = {}
  for key, p in ref.state_dict().items():
    path, arr = timm_convert.convert_array(
        key, np.broadcast_to(np.float32(0), tuple(p.shape)))
    shapes[path] = tuple(arr.shape)
  return ref, shapes


def test_every_registered_vit_is_converted_or_refused_by_name():
  """Every timm vit_* / deit* name: our architecture has timm's exact
  parameter shapes and data config, or the error names what is missing."""
  converted, refused = [], []
  for name in timm.list_models(['vit_*', 'deit*']):
    try:
      cfg = timm_convert.model_config(name)
    except ValueError as e:
      assert "needs what lvtp_jax's ViT does not have:" in str(e), name
      refused.append(name)
      continue
    ref, theirs = _timm_shapes(name)
    model = timm_convert.vit_lib.ViT(num_classes=ref.num_classes,
                                     **cfg['model'])
    assert timm_convert.expected_shapes(model) == theirs, name
    pcfg = ref.pretrained_cfg
    np.testing.assert_allclose(cfg['data']['mean'], pcfg['mean'])
    assert cfg['data']['crop_pct'] == pcfg['crop_pct'], name
    assert cfg['data']['img_size'] == pcfg['input_size'][-1], name
    # Without timm the plain names give the same architecture.
    if timm_convert._NAME_RE.match(name):  # pylint: disable=protected-access
      assert timm_convert._name_architecture(name)['model'] == cfg[  # pylint: disable=protected-access
          'model'], name
    converted.append(name)
  # The families the papers use are all in.
  for name in ('vit_small_patch8_224', 'deit3_small_patch16_224',
               'vit_base_patch14_dinov2', 'deit_base_distilled_patch16_384',
               'vit_huge_patch14_224', 'vit_large_patch32_384'):
    assert name in converted, name
  assert len(converted) >= 40, len(converted)   # timm 1.0.31: 42 of 230
  assert 'vit_small_patch14_reg4_dinov2' in refused


@pytest.mark.parametrize('name, size', [
    ('vit_small_patch8_224', 64),           # DINO ViT-S/8 (GTP's model)
    ('deit3_small_patch16_224', 224),       # layer scale, no_embed_class
    ('vit_small_patch14_dinov2', 98),       # patch 14, layer scale, no head
])
def test_more_architectures_match_timm(name, size):
  ref = perturbed_timm(name, img_size=size)
  model, params = from_timm(name, ref.state_dict(), img_size=size)
  x = images(2, size)
  assert_close(ours_logits(model, params, x), timm_logits(ref, x))


def test_average_pooling_with_fc_norm_matches_timm():
  """A model fine-tuned with global_pool='avg' (as MAE's): read from the
  state dict (fc_norm, no norm); also under ToMe, whose MAE rule weighs
  the pooled tokens by their size."""
  from tests import torch_token_reduction as ref_lib  # pylint: disable=g-import-not-at-top
  from lvtp_jax import pruning  # pylint: disable=g-import-not-at-top
  ref = perturbed_timm('vit_small_patch16_224', global_pool='avg')
  model, params = from_timm('vit_small_patch16_224', ref.state_dict())
  assert (model.global_pool, model.fc_norm) == ('avg', True)
  x = images(2, 224, seed=5)
  assert_close(ours_logits(model, params, x), timm_logits(ref, x))
  tome = pruning.attach(model, dict(name='tome', mode='buffer',
                                    tome=dict(r=13, prop_attn=False)))
  want = ref_lib.forward(ref, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                         ref_lib.tome([13] * 12, prop_attn=False)).numpy()
  assert_close(ours_logits(tome, params, x), want)


def test_unsupported_models_are_named():
  with pytest.raises(ValueError, match='register tokens'):
    from_timm('vit_small_patch14_reg4_dinov2', {})
  with pytest.raises(ValueError, match=r'pre_norm, as CLIP'):
    from_timm('vit_base_patch16_clip_224', {})
  with pytest.raises(ValueError, match='the ResNet architecture'):
    from_timm('resnet50', {})
  with pytest.raises(ValueError, match="unknown timm model 'no_such_vit'"):
    from_timm('no_such_vit', {})


def test_names_without_timm(monkeypatch):
  monkeypatch.setitem(sys.modules, 'timm', None)   # import timm fails
  cfg = timm_convert.model_config('deit3_small_patch16_224.fb_in1k')
  assert cfg['model']['layer_scale'] and cfg['model']['no_embed_class']
  with pytest.raises(ValueError, match='Install timm'):
    timm_convert.model_config('vit_small_patch14_dinov2')


def test_tag_suffix_is_accepted():
  ref = perturbed_timm('deit_tiny_patch16_224')
  model, _ = from_timm('deit_tiny_patch16_224.fb_in1k', ref.state_dict())
  assert model.width == 192


def test_mismatched_checkpoint_names_every_bad_key():
  sd = {k: v.numpy() for k, v in
        perturbed_timm('deit_tiny_patch16_224').state_dict().items()}
  del sd['blocks.3.norm1.weight']
  sd['blocks.0.attn.extra'] = np.zeros(3, np.float32)
  sd['blocks.5.mlp.fc1.weight'] = np.zeros((10, 192), np.float32)
  with pytest.raises(ValueError) as err:
    from_timm('deit_tiny_patch16_224', sd)
  msg = str(err.value)
  assert 'missing keys' in msg and 'blocks.3.norm1.weight' in msg
  assert 'unexpected keys' in msg and 'blocks.0.attn.extra' in msg
  assert 'shape mismatches' in msg and 'blocks.5.mlp.fc1.weight (10, 192)' in msg


def test_wrong_architecture_is_refused():
  sd = perturbed_timm('deit_tiny_patch16_224').state_dict()
  with pytest.raises(ValueError, match='shape mismatches'):
    from_timm('deit_small_patch16_224', sd)


def test_training_checkpoint_wrapper_and_readers(tmp_path):
  from safetensors.numpy import save_file
  ref = perturbed_timm('deit_tiny_patch16_224', seed=3)
  sd = ref.state_dict()
  x = images(1, 224, seed=2)
  want = timm_logits(ref, x)
  # A DeiT release .pth holds {'model': state_dict, ...}.
  pth = tmp_path / 'ckpt.pth'
  torch.save({'model': sd, 'epoch': 300}, pth)
  st = tmp_path / 'model.safetensors'
  save_file({k: v.numpy() for k, v in sd.items()}, str(st))
  for path in (pth, st):
    model, params = from_timm('deit_tiny_patch16_224',
                              readers.read_checkpoint(str(path)))
    assert_close(ours_logits(model, params, x), want)
  (tmp_path / 'x.ckpt').write_text('')
  with pytest.raises(ValueError, match='unknown extension'):
    readers.read_checkpoint(str(tmp_path / 'x.ckpt'))
  with pytest.raises(FileNotFoundError):
    readers.read_checkpoint(str(tmp_path / 'absent.pth'))


def test_cli_writes_a_loadable_converted_directory(tmp_path):
  from safetensors.numpy import save_file
  ref = perturbed_timm('deit_tiny_distilled_patch16_224', seed=4)
  st = tmp_path / 'model.safetensors'
  save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(st))
  out = tmp_path / 'converted'
  args = ['timm', '--model', 'deit_tiny_distilled_patch16_224',
          '--checkpoint', str(st), '--out', str(out), '--img-size', '256']
  assert convert_cli.main(args) == 0
  with pytest.raises(FileExistsError, match='--overwrite'):
    convert_cli.main(args)
  assert convert_cli.main(args + ['--overwrite']) == 0
  model, params, meta = pretrained.load(str(out))
  assert meta['source']['model_name'] == 'deit_tiny_distilled_patch16_224'
  assert meta['data']['img_size'] == 256 and model.img_size == 256
  np.testing.assert_allclose(meta['data']['mean'], (0.485, 0.456, 0.406))
  direct_model, direct_params = from_timm(
      'deit_tiny_distilled_patch16_224', ref.state_dict(), img_size=256)
  x = images(1, 256, seed=5)
  np.testing.assert_array_equal(ours_logits(model, params, x),
                                ours_logits(direct_model, direct_params, x))
  with pytest.raises(FileNotFoundError, match='python -m lvtp_jax.convert'):
    pretrained.load(os.path.join(str(tmp_path), 'nowhere'))


def _load_config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs', name + '.py')
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_segmenter_from_an_imagenet_backbone(tmp_path):
  """Encoder from a converted timm ViT, pos_embed resized as the official
  code does (torch bilinear, align_corners=False), head dropped."""
  from lvtp_jax.train import model_init  # pylint: disable=g-import-not-at-top
  segmenter_train = _load_config('segmenter_train')
  torch.manual_seed(0)
  net = timm.create_model('vit_tiny_patch16_224', pretrained=False)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  vit, vit_params = timm_convert.from_timm('vit_tiny_patch16_224', sd)
  out = str(tmp_path / 'vit_ti16')
  pretrained.save(out, vit_params, dict(
      architecture='vit', model=pretrained.module_fields(vit),
      data=dict(mean=[0.5] * 3, std=[0.5] * 3)))

  config = segmenter_train.get_config('variant=T,decoder=linear,aux=dtop')
  config.model.init_from = out
  config.model.img_size = 256
  model, params, prep, initialised = model_init.build(config.model, seed=0)
  assert (model.width, model.depth, model.img_size, model.ln_eps) == (
      192, 12, 256, 1e-5)
  assert prep['mean'] == [0.5] * 3
  assert {p.split('/')[0] for p in initialised} == {
      'decoder', 'aux_head_6', 'aux_head_8'}
  np.testing.assert_array_equal(params['encoder']['blocks_3']['mlp']['fc1'][
      'kernel'], sd['blocks.3.mlp.fc1.weight'].T)
  pe = torch.from_numpy(sd['pos_embed'])
  grid = pe[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode='bilinear',
                                         align_corners=False)
  want = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 192)],
                   1).numpy()
  np.testing.assert_allclose(params['encoder']['pos_embed'], want, atol=1e-6)
  assert 'head' not in params['encoder']
