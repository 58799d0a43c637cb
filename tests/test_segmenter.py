"""Segmenter port against the NumPy reference of the official forward.

State dicts are built with the official key names and torch layouts
(../shared/specs/weights_and_data.md §2.3) and random values, including the
unused 1000-class encoder head that the converter must drop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from lvtp_jax import pretrained
from lvtp_jax.convert import __main__ as convert_cli
from lvtp_jax.convert import from_segmenter
from lvtp_jax.convert import segmenter as seg_convert
from lvtp_jax.convert import timm as timm_convert
from lvtp_jax.models import segmenter as seg_lib
from tests import segmenter_reference as ref

REL_TOL = 1e-4


def _block_keys(prefix, d):
  return {
      prefix + 'norm1.weight': (d,), prefix + 'norm1.bias': (d,),
      prefix + 'norm2.weight': (d,), prefix + 'norm2.bias': (d,),
      prefix + 'attn.qkv.weight': (3 * d, d), prefix + 'attn.qkv.bias': (3 * d,),
      prefix + 'attn.proj.weight': (d, d), prefix + 'attn.proj.bias': (d,),
      prefix + 'mlp.fc1.weight': (4 * d, d), prefix + 'mlp.fc1.bias': (4 * d,),
      prefix + 'mlp.fc2.weight': (d, 4 * d), prefix + 'mlp.fc2.bias': (d,),
  }


def official_shapes(net, decoder_layers):
  """Key -> shape of an official checkpoint['model'] (spec §2.3)."""
  d, p, crop = net['d_model'], net['patch_size'], net['image_size'][0]
  n_prefix = 2 if net.get('distilled') else 1
  n_cls = net['n_cls']
  shapes = {
      'encoder.cls_token': (1, 1, d),
      'encoder.pos_embed': (1, (crop // p) ** 2 + n_prefix, d),
      'encoder.patch_embed.proj.weight': (d, 3, p, p),
      'encoder.patch_embed.proj.bias': (d,),
      'encoder.norm.weight': (d,), 'encoder.norm.bias': (d,),
      'encoder.head.weight': (1000, d), 'encoder.head.bias': (1000,),
  }
  if net.get('distilled'):
    shapes.update({'encoder.dist_token': (1, 1, d),
                   'encoder.head_dist.weight': (1000, d),
                   'encoder.head_dist.bias': (1000,)})
  for i in range(net['n_layers']):
    shapes.update(_block_keys(f'encoder.blocks.{i}.', d))
  if net['decoder']['name'] == 'linear':
    shapes.update({'decoder.head.weight': (n_cls, d),
                   'decoder.head.bias': (n_cls,)})
  else:
    shapes.update({
        'decoder.cls_emb': (1, n_cls, d), 'decoder.proj_patch': (d, d),
        'decoder.proj_classes': (d, d), 'decoder.proj_dec.weight': (d, d),
        'decoder.proj_dec.bias': (d,), 'decoder.decoder_norm.weight': (d,),
        'decoder.decoder_norm.bias': (d,), 'decoder.mask_norm.weight': (n_cls,),
        'decoder.mask_norm.bias': (n_cls,)})
    for i in range(decoder_layers):
      shapes.update(_block_keys(f'decoder.blocks.{i}.', d))
  return shapes


def random_state_dict(net, decoder_layers, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in official_shapes(net, decoder_layers).items():
    v = rng.standard_normal(shape).astype(np.float32)
    if k.endswith(('norm1.weight', 'norm2.weight', 'norm.weight')):
      v = 1.0 + 0.2 * v
    elif k.endswith('.weight') or k in ('decoder.proj_patch',
                                        'decoder.proj_classes'):
      v = v * (shape[-1] ** -0.5)
    else:
      v = 0.1 * v
    sd[k] = v
  return sd


def _net(decoder='mask_transformer', distilled=False, n_layers=2):
  return dict(image_size=[64, 64], patch_size=16, d_model=128, n_heads=2,
              n_layers=3, n_cls=5, normalization='deit' if distilled else 'vit',
              distilled=distilled,
              decoder=dict(name=decoder, n_layers=n_layers, dropout=0.1,
                           drop_path_rate=0.0))


def _check(model, params, sd, net, hw, seed=0):
  x = np.random.default_rng(seed).standard_normal(
      (2,) + hw + (3,)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(x)))
  want = ref.segmenter_forward(x, sd, net)
  assert ours.shape == want.shape == (2,) + hw + (net['n_cls'],)
  err = np.abs(ours - want).max()
  assert err <= REL_TOL * np.abs(want).max(), err


@pytest.mark.parametrize('decoder, distilled', [
    ('mask_transformer', False), ('linear', True)])
@pytest.mark.parametrize('hw', [(64, 64), (70, 50), (96, 128)])
def test_matches_numpy_reference_of_official_forward(decoder, distilled, hw):
  # (64, 64) is the training crop; (70, 50) needs padding and a
  # forward-time pos_embed resize to a non-square grid; (96, 128) upsizes.
  net = _net(decoder, distilled)
  sd = random_state_dict(net, 2, seed=hash((decoder, hw)) % 1000)
  model, params = from_segmenter({'model': sd, 'epoch': 3},
                                 variant=dict(net_kwargs=net))
  assert model.decoder == decoder and model.distilled == distilled
  _check(model, params, sd, net, hw)


def test_decoder_depth_is_read_from_the_keys():
  net = _net(n_layers=1)
  sd = random_state_dict(net, 1, seed=3)
  model, params = from_segmenter(sd, variant=net)
  assert model.decoder_depth == 1
  _check(model, params, sd, net, (64, 64))
  with pytest.raises(ValueError, match='n_layers=2 but the checkpoint has'):
    from_segmenter(random_state_dict(_net(n_layers=2), 1), variant=_net())


def test_key_list_matches_the_spec_for_seg_s_mask():
  # Seg-S-Mask/16 on ADE20K at 512: 185 keys (spec §2.3), 2 of them the
  # unused encoder head.
  net = dict(image_size=[512, 512], patch_size=16, d_model=384, n_heads=6,
             n_layers=12, n_cls=150, normalization='vit', distilled=False,
             decoder=dict(name='mask_transformer', n_layers=2))
  shapes = official_shapes(net, 2)
  assert len(shapes) == 185
  assert shapes['encoder.pos_embed'] == (1, 1025, 384)
  model = seg_lib.Segmenter(**seg_convert.model_fields(net, 2))
  expected = timm_convert.expected_shapes(model)
  converted = {}
  for k, shape in shapes.items():
    if k.startswith('encoder.head'):
      continue
    path, arr = timm_convert.convert_array(
        k, np.broadcast_to(np.float32(0), shape))
    converted[path] = tuple(arr.shape)
  assert converted == expected


def test_mismatched_variant_names_the_keys():
  net = _net()
  sd = random_state_dict(net, 2)
  wrong = dict(net, n_cls=7)
  with pytest.raises(ValueError) as err:
    from_segmenter(sd, variant=wrong)
  msg = str(err.value)
  assert 'decoder.cls_emb (1, 5, 128)' in msg and 'decoder.mask_norm' in msg
  assert 'variant.yml' in msg
  wrong_size = dict(net, image_size=[96, 96])
  with pytest.raises(ValueError, match='encoder.pos_embed'):
    from_segmenter(sd, variant=wrong_size)
  del sd['encoder.blocks.1.mlp.fc2.bias']
  with pytest.raises(ValueError, match='missing keys.*encoder.blocks.1.mlp.fc2.bias'):
    from_segmenter(sd, variant=net)
  with pytest.raises(ValueError, match='missing'):
    from_segmenter(sd, variant=dict(image_size=[64, 64]))


def test_cli_converts_an_official_checkpoint(tmp_path):
  net = _net(distilled=True)
  sd = random_state_dict(net, 2, seed=5)
  ckpt = tmp_path / 'checkpoint.pth'
  torch.save(dict(model={k: torch.from_numpy(v) for k, v in sd.items()},
                  n_cls=5, epoch=64), ckpt)
  variant = tmp_path / 'variant.yml'
  variant.write_text(yaml.dump(dict(
      net_kwargs=net, inference_kwargs=dict(im_size=64, window_size=64,
                                            window_stride=32))))
  out = tmp_path / 'converted'
  assert convert_cli.main(['segmenter', '--checkpoint', str(ckpt), '--variant',
                           str(variant), '--out', str(out)]) == 0
  model, params, meta = pretrained.load(str(out))
  assert meta['architecture'] == 'segmenter'
  np.testing.assert_allclose(meta['data']['mean'],
                             np.array([123.68, 116.28, 103.53]) / 255)
  assert (meta['data']['window_size'], meta['data']['window_stride']) == (64, 32)
  _check(model, params, sd, net, (70, 50))


def test_aux_heads_give_token_logits_without_changing_the_output():
  net = _net()
  sd = random_state_dict(net, 2, seed=6)
  base, params = from_segmenter(sd, variant=net)
  with_aux = base.clone(aux_layers=(1, 2), aux_head='linear')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 70, 50, 3)),
                  jnp.float32)
  aux_params = with_aux.init(jax.random.PRNGKey(0), x)['params']
  merged = dict(aux_params, encoder=params['encoder'], decoder=params['decoder'])
  logits, aux = with_aux.apply({'params': merged}, x, return_aux=True)
  np.testing.assert_allclose(logits, base.apply({'params': params}, x),
                             rtol=1e-6, atol=1e-6)
  assert sorted(aux['aux_logits']) == [1, 2]
  assert aux['aux_logits'][1].shape == (2, 20, 5)     # 5 x 4 token grid
  assert aux['token_logits'].shape == (2, 20, 5)
  np.testing.assert_array_equal(aux['grid'], [5, 4])
  np.testing.assert_array_equal(aux['valid_tokens'], np.full((2, 3), 21))
  mask_aux = base.clone(aux_layers=(2,), aux_head='mask_transformer')
  _, aux = mask_aux.apply(mask_aux.init(jax.random.PRNGKey(0), x), x,
                          return_aux=True)
  assert aux['aux_logits'][2].shape == (2, 20, 5)
  with pytest.raises(ValueError, match='aux_layers'):
    base.clone(aux_layers=(3,)).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((1, 32, 32, 4), np.float32), '3 channels'),
    (np.zeros((1, 32, 32, 3), np.int32), 'floating point'),
])
def test_bad_images(bad, match):
  net = _net()
  model, params = from_segmenter(random_state_dict(net, 2), variant=net)
  with pytest.raises(ValueError, match=match):
    model.apply({'params': params}, jnp.asarray(bad))


@pytest.mark.parametrize('in_hw,out_hw', [((8, 8), (128, 128)),
                                          ((5, 7), (80, 112)),
                                          ((6, 9), (17, 40)),
                                          ((20, 12), (7, 12)),
                                          ((4, 4), (4, 4))])
def test_bilinear_resize_is_torch_interpolate(in_hw, out_hw):
  x = np.random.default_rng(3).standard_normal((2,) + in_hw + (5,)).astype(
      np.float32)
  got = np.asarray(seg_lib.bilinear_resize(jnp.asarray(x), out_hw))
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode='bilinear',
      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6)
  jax_ref = jax.image.resize(jnp.asarray(x), (2,) + out_hw + (5,), 'linear',
                             antialias=False)
  np.testing.assert_allclose(got, np.asarray(jax_ref), atol=2e-6)
