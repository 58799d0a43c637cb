"""BAT (spec classification_policies.md §4.2, a reconstruction: there is no
official code): DPC-KNN against a NumPy restatement of the equations, the
whole forward against the PyTorch restatement in
tests/torch_token_reduction.py on perturbed timm weights, masked == buffer,
token counts, the source map and the errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvtp_jax import pruning
from lvtp_jax.convert import from_timm
from lvtp_jax.models import vit as vit_lib
from lvtp_jax.pruning.policies import bat
from tests import test_convert_timm as timm_parity
from tests import test_inblock
from tests import tiny_segmenter as tiny
from tests import torch_token_reduction as ref


def _numpy_dpc_knn(y, c, k):
  """Spec §4.2 item 2 in float64 NumPy, one image, written with loops."""
  m, ch = y.shape
  dist = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      dist[i, j] = np.sqrt(((y[i] - y[j]) ** 2).sum()) / math.sqrt(ch)
  density = np.array([np.exp(-np.mean(np.sort(dist[i])[:min(k, m)] ** 2))
                      for i in range(m)])
  separation = np.zeros(m)
  for i in range(m):
    denser = [j for j in range(m) if density[j] > density[i]
              or (density[j] == density[i] and j < i)]
    separation[i] = dist[i, denser].min() if denser else dist[i].max()
  score = density * separation
  centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
  assign = [int(np.argmin([dist[i, j] for j in centres])) for i in range(m)]
  for rank, centre in enumerate(centres):
    assign[centre] = rank
  return np.array(centres), np.array(assign)


@pytest.mark.parametrize('m, c, k', [(12, 3, 5), (30, 8, 5), (7, 7, 3),
                                     (9, 2, 20)])
def test_dpc_knn_matches_the_equations(m, c, k):
  rng = np.random.default_rng(m * 100 + c)
  # Clumps, so that densities and separations differ clearly.
  centres = rng.normal(size=(4, 16)) * 3
  y = (centres[rng.integers(0, 4, size=(2, m))] +
       rng.normal(size=(2, m, 16)) * 0.5).astype(np.float32)
  got_c, got_a = bat.dpc_knn(jnp.asarray(y), c, k)
  for b in range(2):
    want_c, want_a = _numpy_dpc_knn(y[b].astype(np.float64), c, k)
    np.testing.assert_array_equal(np.asarray(got_c[b]), want_c)
    np.testing.assert_array_equal(np.asarray(got_a[b]), want_a)
    # The PyTorch restatement the forward parity uses agrees as well.
    tc, ta = ref.dpc_knn(torch.from_numpy(y[b]), c, k)
    np.testing.assert_array_equal(tc.numpy(), want_c)
    np.testing.assert_array_equal(ta.numpy(), want_a)


def test_density_ties_go_to_the_lower_slot():
  y = np.zeros((1, 4, 8), np.float32)     # every token alike
  centres, assign = bat.dpc_knn(jnp.asarray(y), 2, 3)
  # Slot 0 is the densest; the others are equally dense and as far away
  # (0), so the separation ranks slot 0 (row max 0, density 1) with them
  # and the lower slots win.
  np.testing.assert_array_equal(centres[0], [0, 1])
  assert assign[0, 0] == 0 and assign[0, 1] == 1


@pytest.fixture(scope='module')
def deit_small():
  model = timm_parity.perturbed_timm('deit_small_patch16_224')
  ours, params = from_timm('deit_small_patch16_224', model.state_dict())
  return model, ours, params, timm_parity.images(2, 224, seed=1)


@pytest.mark.parametrize('cfg', [
    dict(keep_rate=0.7),
    dict(keep_rate=0.5, cluster_ratio=0.5, knn_k=3,
         cluster_weights='uniform', match_metric='x', prop_attn=True),
], ids=str)
def test_bat_matches_the_reconstruction(deit_small, cfg):
  model, ours, params, x = deit_small
  got, aux = test_inblock._ours(ours, params, x,  # pylint: disable=protected-access
                                dict(name='bat', mode='buffer', bat=cfg))
  full = dict(pruning.get('bat').config_defaults().to_dict(), **cfg)
  want = test_inblock._reference(  # pylint: disable=protected-access
      model, x, ref.bat(full['layers'], full['keep_rate'],
                        full['cluster_ratio'], full['knn_k'],
                        full['cluster_weights'], full['match_metric'],
                        full['prop_attn']))
  timm_parity.assert_close(got, want)
  # Every stage leaves about as many tokens as EViT keeps (c = r).
  counts = list(np.asarray(aux['mlp_tokens'][0]))
  if cfg['keep_rate'] == 0.7:
    assert counts[3] == 1 + 138 and counts[6] == 1 + 97 and counts[9] == 1 + 68


_SETTINGS = [dict(name='bat', bat=dict(keep_rate=0.5)),
             dict(name='bat', bat=dict(keep_rate=0.6, cluster_ratio=0.5,
                                       match_metric='x', prop_attn=True))]


@pytest.mark.parametrize('cfg', _SETTINGS, ids=str)
def test_masked_equals_buffer_and_the_source_map(cfg):
  model, params = test_inblock._TINY, test_inblock._TINY_PARAMS  # pylint: disable=protected-access
  x = np.asarray(tiny.images(4, batch=3)).repeat(2, axis=1).repeat(2, axis=2)
  masked, maux = test_inblock._ours(model, params, x, dict(cfg, mode='masked'))  # pylint: disable=protected-access
  buffer, baux = test_inblock._ours(model, params, x, dict(cfg, mode='buffer'))  # pylint: disable=protected-access
  np.testing.assert_allclose(masked, buffer, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(maux['state'].src, baux['state'].src)
  state = baux['state']
  src, size = np.asarray(state.src), np.asarray(state.size)
  assert (src >= 1).all()   # every patch is matched, kept or clustered
  for b in range(3):
    owned = np.bincount(src[b], minlength=state.capacity)
    np.testing.assert_array_equal(owned[1:], size[b, 1:])
  spec = pruning.build_spec(dict(cfg, mode='buffer'), model)
  counts = pruning.get('bat').token_counts(spec.params, 17, 1, 12)
  np.testing.assert_array_equal(baux['mlp_tokens'][0], counts[1:])


@pytest.mark.parametrize('cfg, match', [
    (dict(cluster_ratio=0.0), r'bat.cluster_ratio=0.0 must lie'),
    (dict(knn_k=0), r'bat.knn_k=0 must be >= 1'),
    (dict(cluster_weights='size'), r'cluster_weights=.size.'),
    (dict(match_metric='cos'), r'match_metric=.cos.'),
    (dict(keep_rate=1.5), r'bat.keep_rate=1.5 must lie'),
    (dict(layers=(4, 13)), r'beyond the model'),
])
def test_config_errors_name_the_field(cfg, match):
  model = vit_lib.create_vit('Ti/16', img_size=64, num_classes=10)
  with pytest.raises(ValueError, match=match):
    pruning.build_spec(dict(name='bat', mode='buffer', bat=cfg), model)
