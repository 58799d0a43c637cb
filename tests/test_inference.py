"""Sliding-window inference against a NumPy re-statement of the official rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvtp_jax.evaluation import inference
from lvtp_jax.models import segmenter as seg_lib
from tests import segmenter_reference as ref

C = 3


def _toy_predict(crops):
  """Per-pixel projection plus a per-window offset (the crop's mean), so the
  merged result depends on which windows cover a pixel."""
  proj = jnp.asarray(np.arange(3 * C, dtype=np.float32).reshape(3, C) / 10)
  return crops @ proj + crops.mean(axis=(1, 2, 3))[:, None, None, None]


def _reference_merge(image, window, stride):
  h, w = image.shape[:2]
  anchors = lambda n: [a for a in range(0, n, stride) if a < n - window] + [
      n - window]
  total = np.zeros((h, w, C))
  count = np.zeros((h, w, 1))
  for y in anchors(h):
    for x in anchors(w):
      crop = image[y:y + window, x:x + window]
      total[y:y + window, x:x + window] += np.asarray(_toy_predict(crop[None]))[0]
      count[y:y + window, x:x + window] += 1
  return total / count


def test_anchors_follow_the_official_rule():
  assert inference.window_anchors(512, 512, 480) == [0]
  assert inference.window_anchors(700, 512, 480) == [0, 188]
  assert inference.window_anchors(1500, 512, 480) == [0, 480, 960, 988]
  with pytest.raises(ValueError, match='shorter than the window'):
    inference.window_anchors(100, 128, 64)


@pytest.mark.parametrize('hw, window, stride', [
    ((40, 70), 32, 24), ((64, 64), 64, 48), ((50, 33), 32, 32)])
def test_merge_matches_reference(hw, window, stride):
  image = np.random.default_rng(0).random(hw + (3,)).astype(np.float32)
  got = inference.sliding_window_logits(_toy_predict, jnp.asarray(image),
                                        window=window, stride=stride,
                                        batch_size=3)
  np.testing.assert_allclose(got, _reference_merge(image, window, stride),
                             rtol=1e-5, atol=1e-5)


def test_short_images_are_upsampled_like_torch_bilinear():
  image = np.random.default_rng(1).random((30, 45, 3)).astype(np.float32)
  up = inference.upsample_to_window(jnp.asarray(image), 40)
  assert up.shape == (40, 60, 3)  # long side int(45 / 30 * 40)
  want = ref.bilinear_nchw(image.transpose(2, 0, 1)[None].astype(np.float64),
                           (40, 60))[0].transpose(1, 2, 0)
  np.testing.assert_allclose(up, want, atol=1e-5)
  big = jnp.zeros((50, 60, 3))
  assert inference.upsample_to_window(big, 40) is big


def test_segment_modes_on_a_segmenter():
  model = seg_lib.Segmenter(num_classes=4, width=64, depth=2, num_heads=1,
                            mlp_dim=128, patch_size=16, img_size=32,
                            decoder='linear')
  image = jnp.asarray(np.random.default_rng(2).standard_normal((40, 56, 3)),
                      jnp.float32)
  params = model.init(jax.random.PRNGKey(0), image[None])['params']
  predict = inference.predict_fn_for(model, params)
  slide = inference.segment(predict, image, out_size=(40, 56), mode='slide',
                            window=32, stride=16, batch_size=4)
  assert slide.shape == (40, 56, 4)
  np.testing.assert_allclose(slide.sum(-1), 1.0, rtol=1e-5)
  whole = inference.segment(predict, image, out_size=(20, 28), mode='whole')
  assert whole.shape == (20, 28, 4)
  # One window covering the image is the same as whole-image inference.
  one = inference.segment(predict, image[:32, :32], out_size=(32, 32),
                          window=32, stride=32)
  np.testing.assert_allclose(
      one, inference.segment(predict, image[:32, :32], out_size=(32, 32),
                             mode='whole'), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='inference mode'):
    inference.segment(predict, image, out_size=(40, 56), mode='tiles')
  with pytest.raises(ValueError, match='stride'):
    inference.segment(predict, image, out_size=(40, 56), window=32, stride=40)
