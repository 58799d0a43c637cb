"""The paired image bootstrap (lvtp_jax.evaluation.paired) and the per-image
confusion matrices it reads, against direct NumPy re-statements."""

import numpy as np
import pytest

from lvtp_jax.evaluation import paired
from lvtp_jax.evaluation import segmentation_metrics as sm


def _confusions(rng, n, c, zero_class=None):
  """int [n, c, c] per-image matrices, mostly diagonal."""
  out = rng.integers(0, 20, size=(n, c, c))
  out += np.eye(c, dtype=np.int64)[None] * rng.integers(50, 400, (n, 1, 1))
  if zero_class is not None:
    out[:, zero_class, :] = 0
    out[:, :, zero_class] = 0
  return out


def test_batched_miou_equals_metrics_from_confusion():
  rng = np.random.default_rng(0)
  cms = _confusions(rng, 6, 5, zero_class=3)
  cms[0] = 0                                    # no class defined: NaN
  got = sm.mean_iou(cms)
  assert np.isnan(got[0]) and np.isnan(sm.metrics_from_confusion(cms[0])[
      'miou'])
  for cm, value in zip(cms[1:], got[1:]):
    assert value == pytest.approx(sm.metrics_from_confusion(cm)['miou'],
                                  abs=1e-12)
  np.testing.assert_allclose(sm.per_class_iou(cms)[2],
                             sm.per_class_iou(cms[2]))


def test_per_image_matrices_add_up_and_skip_padding():
  rng = np.random.default_rng(1)
  c = 4
  labels = rng.integers(0, c, size=(3, 12, 12))
  labels[:, :, :6] = 0                          # a boundary in every image
  labels[1, 0, :] = 255                         # some ignored pixels
  preds = np.where(rng.random(labels.shape) < 0.8, labels % 255,
                   rng.integers(0, c, size=labels.shape))
  metrics = sm.SegmentationMetrics(c, boundary_width=1, per_image=True)
  # A batch whose last row is padding, then one [H, W] image (slide mode).
  pad = np.zeros((1, 12, 12), np.int64)
  metrics.update(np.concatenate([preds[:2], pad]),
                 np.concatenate([labels[:2], pad]),
                 mask=np.array([True, True, False]))
  metrics.update(preds[2], labels[2])
  full, band = metrics.image_confusions()
  assert full.shape == band.shape == (3, c, c)
  np.testing.assert_array_equal(full.sum(0), metrics.confusion)
  np.testing.assert_array_equal(band.sum(0), metrics.boundary_confusion)
  for i in range(3):
    np.testing.assert_array_equal(
        full[i], sm.confusion_matrix(preds[i], labels[i], c))
  assert band.sum() < full.sum()
  with pytest.raises(ValueError, match='per_image=True'):
    sm.SegmentationMetrics(c).image_confusions()


def test_resampled_miou_matches_summing_the_drawn_images():
  rng = np.random.default_rng(2)
  per_image = _confusions(rng, 9, 4, zero_class=1)
  counts = paired.bootstrap_counts(9, 300, seed=3)
  assert (counts.sum(axis=1) == 9).all()
  np.testing.assert_array_equal(counts, paired.bootstrap_counts(9, 300, 3))
  got = paired.resampled_miou(per_image, counts)
  for r in (0, 7, 299):
    drawn = np.repeat(np.arange(9), counts[r])
    want = sm.metrics_from_confusion(per_image[drawn].sum(0))['miou']
    assert got[r] == pytest.approx(want, abs=1e-10)
  observed = paired.resampled_miou(per_image, np.ones((1, 9), np.int64))
  assert observed[0] == pytest.approx(
      sm.metrics_from_confusion(per_image.sum(0))['miou'], abs=1e-10)
  with pytest.raises(ValueError, match='at least 2 images'):
    paired.bootstrap_counts(1, 1000, 0)
  with pytest.raises(ValueError, match='at least 100'):
    paired.bootstrap_counts(9, 10, 0)


def _setting(full):
  return dict(image_confusion=full, image_boundary_confusion=full // 3)


def test_compare_identical_better_and_unpaired():
  rng = np.random.default_rng(4)
  a = _confusions(rng, 40, 5)
  counts = paired.bootstrap_counts(40, 500, seed=0)
  same = paired.compare(_setting(a), _setting(a), counts)
  for m in paired.METRICS:
    assert same[m]['diff'] == 0 and same[m]['low'] == same[m]['high'] == 0
    assert same[m]['p_b_ge_a'] == 1.0
  # B: every off-diagonal pixel of A moved onto the diagonal (same labels).
  perfect = np.zeros_like(a)
  idx = np.arange(5)
  perfect[:, idx, idx] = a.sum(axis=-1)
  better = paired.compare(_setting(a), _setting(perfect), counts)
  assert better['miou']['b'] == pytest.approx(100.0)
  assert better['miou']['low'] > 0 and better['miou']['p_b_ge_a'] == 1.0
  assert better['miou']['low'] <= better['miou']['diff'] <= better['miou'][
      'high']
  shifted = a.copy()
  shifted[0, 0, 0] += 1                         # a different ground truth
  with pytest.raises(ValueError, match='not evaluated on the same images'):
    paired.compare(_setting(a), _setting(shifted), counts)
  with pytest.raises(ValueError, match='counts are for'):
    paired.compare(_setting(a), _setting(a), counts[:, :10])


def test_interval_narrows_as_one_over_sqrt_images():
  """Sixteen copies of the same 60 images: the resampled differences
  spread 4x less (the bootstrap's sqrt(N) scaling)."""
  rng = np.random.default_rng(5)
  a = _confusions(rng, 60, 4)
  b = a.copy()                                  # same labels, other errors
  moved = rng.integers(0, 40, size=(60, 4))
  rows = np.arange(4)
  b[:, rows, rows] -= moved
  b[:, rows, (rows + 1) % 4] += moved
  small = paired.compare(_setting(a), _setting(b),
                         paired.bootstrap_counts(60, 4000, 0))
  tiled = paired.compare(_setting(np.tile(a, (16, 1, 1))),
                         _setting(np.tile(b, (16, 1, 1))),
                         paired.bootstrap_counts(960, 4000, 1))
  assert tiled['miou']['diff'] == pytest.approx(small['miou']['diff'])
  assert tiled['miou']['std'] == pytest.approx(small['miou']['std'] / 4,
                                               rel=0.1)


def test_pairs_from_picks():
  picks = [dict(cut=0.3, policy='dtop', name='d9'),
           dict(cut=0.3, policy='lvtp', name='l1'),
           dict(cut=0.4, policy='dtop', name='d6'),
           dict(cut=0.4, policy='lvtp', name=None),
           dict(cut=0.5, policy='dtop', name=None),
           dict(cut=0.5, policy='lvtp', name='l2'),
           dict(cut=0.6, policy='dtop', name='d9'),
           dict(cut=0.6, policy='lvtp', name='l1')]
  assert paired.pairs_from_picks(picks, 'dtop') == [('d9', 'l1')]
  assert paired.pairs_from_picks(picks, 'lvtp') == [('l1', 'd9')]
  with pytest.raises(ValueError, match="no policy 'evit'"):
    paired.pairs_from_picks(picks, 'evit')


def test_parse_pairs():
  assert paired.parse_pairs(['a:b', 'c_1:d/2']) == [('a', 'b'), ('c_1', 'd/2')]
  for bad in ('ab', 'a:', ':b', 'a:b:c'):
    with pytest.raises(ValueError, match='write A:B'):
      paired.parse_pairs([bad])


def test_paired_accuracy_difference_and_its_interval():
  rng = np.random.default_rng(0)
  a = rng.random(400) < 0.7
  b = a.copy()
  b[:40] = True                      # B fixes some of A's errors, never worse
  counts = paired.bootstrap_counts(400, 2000, seed=1)
  out = paired.compare_accuracy(a, b, counts)
  assert out['a'] == pytest.approx(100 * a.mean())
  assert out['diff'] == pytest.approx(100 * (b.mean() - a.mean()))
  # Resampling the images by hand gives the same interval.
  diffs = [100 * ((b[idx].mean()) - a[idx].mean()) for idx in (
      np.repeat(np.arange(400), c) for c in counts)]
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  assert (out['low'], out['high']) == pytest.approx((lo, hi))
  assert out['low'] >= 0 and out['p_b_ge_a'] == 1.0
  same = paired.compare_accuracy(a, a, counts)
  assert same['diff'] == 0 and same['low'] == same['high'] == 0
  with pytest.raises(ValueError, match='same images'):
    paired.compare_accuracy(a, b[:-1], counts)
