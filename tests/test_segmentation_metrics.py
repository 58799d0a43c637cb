"""Segmentation metrics: confusion matrix, mIoU, boundary band, boundary mIoU.

Expected values are computed by hand (arithmetic in the comments) or by
brute-force loops, never by the code under test.
"""

import math
import time

import numpy as np
import pytest

from lvtp_jax.evaluation import segmentation_metrics as sm

IGN = 255

# 4x4 hand case, 3 classes, two ignore pixels (bottom right).
LABEL_4x4 = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 1, 1],
                      [2, 2, IGN, IGN]])
PRED_4x4 = np.array([[0, 0, 1, 1],
                     [0, 1, 1, 1],
                     [2, 0, 1, 2],
                     [2, 2, 0, 1]])
# GT 0 at (0,0),(0,1),(1,0),(1,1): preds 0,0,0,1       -> row 0 = [3, 1, 0]
# GT 1 at (0,2),(0,3),(1,2),(1,3),(2,2),(2,3): 1,1,1,1,1,2 -> row 1 = [0, 5, 1]
# GT 2 at (2,0),(2,1),(3,0),(3,1): preds 2,0,2,2       -> row 2 = [1, 0, 3]
# (3,2),(3,3) are ignore: their predictions 0, 1 are not counted.
CM_4x4 = np.array([[3, 1, 0],
                   [0, 5, 1],
                   [1, 0, 3]])


def _stripes(h, w, split, left=0, right=1):
  """[H, W] map with class `left` in columns < split, `right` elsewhere."""
  out = np.full((h, w), right)
  out[:, :split] = left
  return out


def _brute_force_band(label, d, ignore):
  """Reference boundary band with explicit loops over pixels and windows."""
  b, h, w = label.shape
  out = np.zeros(label.shape, bool)
  for n in range(b):
    for y in range(h):
      for x in range(w):
        v = label[n, y, x]
        if v == ignore:
          continue
        for yy in range(max(0, y - d), min(h, y + d + 1)):
          for xx in range(max(0, x - d), min(w, x + d + 1)):
            u = label[n, yy, xx]
            if u != ignore and u != v:
              out[n, y, x] = True
  return out


# --- confusion matrix and the mmseg metrics ---------------------------------


def test_confusion_matrix_hand_4x4():
  cm = sm.confusion_matrix(PRED_4x4, LABEL_4x4, num_classes=3)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, CM_4x4)
  # Batched [1, 4, 4] input gives the same matrix.
  np.testing.assert_array_equal(
      sm.confusion_matrix(PRED_4x4[None], LABEL_4x4[None], 3), CM_4x4)


def test_metrics_hand_4x4():
  m = sm.metrics_from_confusion(CM_4x4)
  # Column sums (predicted): [4, 6, 4]; row sums (GT): [4, 6, 4].
  # IoU0 = 3 / (4 + 4 - 3) = 3/5; IoU1 = 5 / (6 + 6 - 5) = 5/7;
  # IoU2 = 3 / (4 + 4 - 3) = 3/5.
  ious = [3 / 5, 5 / 7, 3 / 5]
  np.testing.assert_allclose(m['per_class_iou'], [100 * v for v in ious])
  # mIoU = (0.6 + 0.714285... + 0.6) / 3 = 0.638095...
  assert m['miou'] == pytest.approx(100 * (0.6 + 5 / 7 + 0.6) / 3)
  assert m['miou'] == pytest.approx(63.8095238, abs=1e-6)
  # aAcc = (3 + 5 + 3) / 14 counted pixels = 11/14 = 78.571...%
  assert m['pixel_accuracy'] == pytest.approx(100 * 11 / 14)
  # Class accuracies 3/4, 5/6, 3/4 -> mean 0.7777...
  assert m['mean_accuracy'] == pytest.approx(100 * (0.75 + 5 / 6 + 0.75) / 3)
  assert m['num_pixels'] == 14


def test_accumulator_hand_4x4():
  metrics = sm.SegmentationMetrics(num_classes=3, boundary_width=1)
  metrics.update(PRED_4x4, LABEL_4x4)
  r = metrics.result()
  np.testing.assert_array_equal(metrics.confusion, CM_4x4)
  assert r['miou'] == pytest.approx(100 * (0.6 + 5 / 7 + 0.6) / 3)
  assert r['pixel_accuracy'] == pytest.approx(100 * 11 / 14)


def test_ignore_pixels_not_counted_whatever_is_predicted():
  label = np.array([[0, IGN], [1, IGN]])
  pred_a = np.array([[0, 0], [1, 0]])
  pred_b = np.array([[0, 1], [1, 1]])
  # Only (0,0) GT0->0 and (1,0) GT1->1 count.
  expected = np.array([[1, 0], [0, 1]])
  np.testing.assert_array_equal(sm.confusion_matrix(pred_a, label, 2), expected)
  np.testing.assert_array_equal(sm.confusion_matrix(pred_b, label, 2), expected)


def test_custom_ignore_index_and_none():
  label = np.array([[0, 1, 2]])
  pred = np.array([[0, 0, 0]])
  # ignore_index=2: the last pixel is dropped -> [[1, 0, 0], [1, 0, 0], 0...].
  cm = sm.confusion_matrix(pred, label, 3, ignore_index=2)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
  # ignore_index=None: all three count.
  cm = sm.confusion_matrix(pred, label, 3, ignore_index=None)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [1, 0, 0]])


def test_absent_class_is_nan_and_excluded_from_mean():
  # C = 4 but class 3 is in neither GT nor prediction.
  cm = sm.confusion_matrix(PRED_4x4, LABEL_4x4, num_classes=4)
  m = sm.metrics_from_confusion(cm)
  assert math.isnan(m['per_class_iou'][3])
  assert math.isnan(m['per_class_accuracy'][3])
  # The mean over the 3 present classes, not (sum) / 4.
  assert m['miou'] == pytest.approx(100 * (0.6 + 5 / 7 + 0.6) / 3)
  assert m['mean_accuracy'] == pytest.approx(100 * (0.75 + 5 / 6 + 0.75) / 3)


def test_class_only_in_predictions_gets_zero_iou_and_counts():
  label = np.array([[0, 0, 1, 1]])
  pred = np.array([[0, 2, 1, 1]])
  # cm rows GT: 0 -> [1, 0, 1]; 1 -> [0, 2, 0]; 2 -> [0, 0, 0].
  # IoU0 = 1 / (2 + 1 - 1) = 1/2; IoU1 = 2/2 = 1; IoU2 = 0 / (0 + 1 - 0) = 0.
  # mIoU = (0.5 + 1 + 0) / 3 = 0.5 (the 0 counts).
  m = sm.metrics_from_confusion(sm.confusion_matrix(pred, label, 3))
  np.testing.assert_allclose(m['per_class_iou'], [50.0, 100.0, 0.0])
  assert m['miou'] == pytest.approx(50.0)
  # Class 2 has no GT pixel: its accuracy is NaN, mean over classes 0, 1:
  # (1/2 + 2/2) / 2 = 0.75.
  assert math.isnan(m['per_class_accuracy'][2])
  assert m['mean_accuracy'] == pytest.approx(75.0)


def test_mask_per_pixel_and_per_image():
  label = np.array([[[0, 1]], [[1, 1]]])  # [2, 1, 2]
  pred = np.array([[[0, 0]], [[0, 1]]])
  # Per image: image 1 dropped -> only image 0: GT0->0, GT1->0.
  cm = sm.confusion_matrix(pred, label, 2, mask=np.array([True, False]))
  np.testing.assert_array_equal(cm, [[1, 0], [1, 0]])
  # Per pixel: keep only the right column of both images: GT1->0, GT1->1.
  mask = np.array([[[False, True]], [[False, True]]])
  cm = sm.confusion_matrix(pred, label, 2, mask=mask)
  np.testing.assert_array_equal(cm, [[0, 0], [1, 1]])


def test_confusion_matrix_matches_loop_on_random_data():
  rng = np.random.default_rng(0)
  c = 5
  label = rng.integers(0, c, (3, 9, 11))
  label[rng.random(label.shape) < 0.2] = IGN
  pred = rng.integers(0, c, label.shape)
  expected = np.zeros((c, c), np.int64)
  for g, p in zip(label.ravel(), pred.ravel()):
    if g != IGN:
      expected[g, p] += 1
  np.testing.assert_array_equal(sm.confusion_matrix(pred, label, c), expected)


def test_accumulation_is_dataset_level_not_mean_of_images():
  label1 = np.array([[0, 0], [0, 1]])
  pred1 = np.array([[0, 0], [0, 1]])  # perfect: per-image mIoU 100
  label2 = np.array([[1, 1], [1, 1]])
  pred2 = np.array([[0, 1], [1, 1]])
  # Image 2 alone: IoU0 = 0 / (0 + 1 - 0) = 0, IoU1 = 3 / (4 + 3 - 3) = 3/4
  # -> per-image mIoU 37.5; mean of per-image mIoUs = (100 + 37.5) / 2 = 68.75.
  # Dataset: cm = [[3, 0], [1, 4]]: IoU0 = 3 / (3 + 4 - 3) = 3/4,
  # IoU1 = 4 / (5 + 4 - 4) = 4/5 -> mIoU = 77.5.
  metrics = sm.SegmentationMetrics(num_classes=2, boundary_width=1)
  metrics.update(pred1, label1)
  metrics.update(pred2, label2)
  r = metrics.result()
  np.testing.assert_array_equal(metrics.confusion, [[3, 0], [1, 4]])
  assert r['miou'] == pytest.approx(77.5)
  assert r['miou'] != pytest.approx(68.75)
  # One call on the concatenated batch gives the same result.
  joint = sm.SegmentationMetrics(num_classes=2, boundary_width=1)
  joint.update(np.stack([pred1, pred2]), np.stack([label1, label2]))
  np.testing.assert_array_equal(joint.confusion, metrics.confusion)
  np.testing.assert_array_equal(joint.boundary_confusion,
                                metrics.boundary_confusion)
  assert joint.result()['miou'] == pytest.approx(77.5)


def test_accumulation_equals_concatenation_random_batches():
  rng = np.random.default_rng(1)
  label = np.kron(rng.integers(0, 4, (6, 4, 4)), np.ones((1, 4, 4), int))
  pred = np.where(rng.random(label.shape) < 0.8, label,
                  rng.integers(0, 4, label.shape))
  one = sm.SegmentationMetrics(4, boundary_width=2)
  one.update(pred, label)
  many = sm.SegmentationMetrics(4, boundary_width=2)
  for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
    many.update(pred[s], label[s])
  a, b = one.result(), many.result()
  for key in ('miou', 'pixel_accuracy', 'mean_accuracy', 'boundary_miou'):
    assert a[key] == pytest.approx(b[key])
  assert 0 < a['boundary_num_pixels'] < a['num_pixels']


def test_result_without_pixels_raises_and_reset():
  metrics = sm.SegmentationMetrics(2, boundary_width=1)
  with pytest.raises(ValueError, match='No labelled pixel'):
    metrics.result()
  metrics.update(np.zeros((2, 2), int), np.full((2, 2), IGN))
  with pytest.raises(ValueError, match='No labelled pixel'):
    metrics.result()
  metrics.update(np.zeros((2, 2), int), np.zeros((2, 2), int))
  assert metrics.result()['miou'] == pytest.approx(100.0)
  metrics.reset()
  assert metrics.confusion.sum() == 0
  assert metrics.boundary_confusion.sum() == 0


def test_metrics_from_empty_confusion_is_nan():
  m = sm.metrics_from_confusion(np.zeros((3, 3), np.int64))
  assert math.isnan(m['miou']) and math.isnan(m['pixel_accuracy'])
  assert m['num_pixels'] == 0


# --- boundary band ----------------------------------------------------------


def test_boundary_mask_two_stripes_hand():
  label = _stripes(5, 8, split=4)  # edge between columns 3 and 4
  # d = 1: columns 3 and 4 (one on each side of the edge).
  expected = np.zeros((5, 8), bool)
  expected[:, 3:5] = True
  np.testing.assert_array_equal(sm.boundary_mask(label, 1), expected)
  # d = 2: columns 2..5.
  expected = np.zeros((5, 8), bool)
  expected[:, 2:6] = True
  np.testing.assert_array_equal(sm.boundary_mask(label, 2), expected)
  # d = 0: empty band.
  assert not sm.boundary_mask(label, 0).any()
  # d larger than the image: every pixel sees the other class.
  assert sm.boundary_mask(label, 10).all()


def test_boundary_mask_diagonal_neighbour_counts_at_d1():
  # Chebyshev distance: the single pixel of class 1 at (2, 2) touches all 8
  # neighbours; (0, 0) is at distance 2 and is not in the band.
  label = np.zeros((5, 5), int)
  label[2, 2] = 1
  expected = np.zeros((5, 5), bool)
  expected[1:4, 1:4] = True
  np.testing.assert_array_equal(sm.boundary_mask(label, 1), expected)


def test_boundary_mask_ignore_handling():
  # Columns 0-2 class 0, column 3 ignore, columns 4-7 class 1.
  label = _stripes(4, 8, split=4)
  label[:, 3] = IGN
  # d = 1: column 2 sees only 0 and ignore, column 4 only ignore and 1; a
  # change to/from ignore is not a boundary -> empty.
  assert not sm.boundary_mask(label, 1).any()
  # d = 2: columns 2 and 4 see each other across the ignore column; the
  # ignore column itself is never in the band.
  expected = np.zeros((4, 8), bool)
  expected[:, [2, 4]] = True
  np.testing.assert_array_equal(sm.boundary_mask(label, 2), expected)
  # With ignore_index=None, 255 is a class: columns 2, 3, 4 at d = 1.
  expected = np.zeros((4, 8), bool)
  expected[:, 2:5] = True
  np.testing.assert_array_equal(
      sm.boundary_mask(label, 1, ignore_index=None), expected)


def test_boundary_mask_batch_images_do_not_bleed():
  # Two uniform images of different classes: no boundary in either (a 3-D
  # filter over the batch axis would mark both).
  label = np.stack([np.zeros((4, 4), int), np.ones((4, 4), int)])
  band = sm.boundary_mask(label, 2)
  assert band.shape == (2, 4, 4)
  assert not band.any()
  # A striped image next to a uniform one: only the striped one has a band.
  label = np.stack([_stripes(4, 6, 3), np.ones((4, 6), int)])
  band = sm.boundary_mask(label, 1)
  assert band[0, :, 2:4].all() and band[0].sum() == 8
  assert not band[1].any()


def test_boundary_mask_image_frame_is_not_a_boundary():
  assert not sm.boundary_mask(np.full((6, 7), 3), 2).any()


@pytest.mark.parametrize('seed', range(4))
def test_boundary_mask_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  values = np.array([0, 1, 2, 5, IGN])
  # Blocky maps (a mix of interiors and edges) and pixel-noise maps.
  blocky = np.kron(values[rng.integers(0, 5, (3, 4, 5))],
                   np.ones((1, 2, 3), int))[:, :7, :13]
  noisy = values[rng.integers(0, 5, (2, 7, 13))]
  for label in (blocky, noisy):
    for d in range(5):
      expected = _brute_force_band(label, d, IGN)
      np.testing.assert_array_equal(sm.boundary_mask(label, d), expected,
                                    err_msg=f'seed={seed} d={d}')
      assert sm.boundary_mask(label.astype(np.uint8), d).tolist() == (
          expected.tolist())


def test_boundary_width_from_ratio_hand():
  # 96x96: diagonal = 96 * sqrt(2) = 135.76; 2% = 2.715 -> 3 px.
  assert sm.boundary_width_from_ratio(96, 96) == 3
  # 128x128: 181.02 * 0.02 = 3.62 -> 4 px.
  assert sm.boundary_width_from_ratio(128, 128) == 4
  # 512x683: sqrt(262144 + 466489) = 853.6; * 0.02 = 17.07 -> 17 px.
  assert sm.boundary_width_from_ratio(512, 683) == 17
  # Tiny image: 0.02 * 5.66 = 0.11 -> clamped to 1.
  assert sm.boundary_width_from_ratio(4, 4) == 1
  # Default accumulator uses the ratio per batch image size.
  assert sm.SegmentationMetrics(2).width_for(96, 96) == 3
  assert sm.SegmentationMetrics(2, boundary_width=5).width_for(96, 96) == 5
  assert sm.SegmentationMetrics(
      2, boundary_width_ratio=0.1).width_for(30, 40) == 5  # 0.1 * 50


# --- boundary mIoU ----------------------------------------------------------


def _stripe_metrics(pred, d=2):
  label = _stripes(16, 16, split=8)
  metrics = sm.SegmentationMetrics(2, boundary_width=d)
  metrics.update(pred, label)
  return metrics.result()


def test_boundary_miou_perfect_prediction():
  r = _stripe_metrics(_stripes(16, 16, split=8))
  assert r['miou'] == pytest.approx(100.0)
  assert r['boundary_miou'] == pytest.approx(100.0)
  # Band: columns 6..9 (d = 2 on each side) -> 4 * 16 = 64 pixels.
  assert r['boundary_num_pixels'] == 64


def test_boundary_miou_unaffected_by_errors_far_from_edges():
  pred = _stripes(16, 16, split=8)
  pred[:, 0] = 1  # column 0 wrong: 6 columns away from the band
  pred[:, 15] = 0  # column 15 wrong
  r = _stripe_metrics(pred)
  # mIoU: class 0 TP = 7 * 16 = 112, FN = 16, FP = 16 -> 112 / 144;
  # same for class 1 -> mIoU = 77.78.
  assert r['miou'] == pytest.approx(100 * 112 / 144)
  assert r['boundary_miou'] == pytest.approx(100.0)


def test_boundary_miou_drops_more_for_errors_at_edges():
  pred = _stripes(16, 16, split=9)  # edge shifted by one: column 8 wrong
  r = _stripe_metrics(pred)
  # All pixels: class 0 TP 128, FP 16 -> 128/144; class 1 TP 112, FN 16
  # -> 112/128; mIoU = (0.8889 + 0.875) / 2 = 88.19.
  assert r['miou'] == pytest.approx(100 * (128 / 144 + 112 / 128) / 2)
  # Band columns 6..9: class 0 TP 32 (cols 6, 7), FP 16 (col 8) -> 32/48;
  # class 1 TP 16 (col 9), FN 16 -> 16/32; boundary mIoU = 58.33.
  assert r['boundary_miou'] == pytest.approx(100 * (32 / 48 + 16 / 32) / 2)
  assert r['boundary_miou'] < r['miou'] - 20


def test_boundary_miou_nan_when_no_band_and_mask_applies_to_band():
  metrics = sm.SegmentationMetrics(2, boundary_width=1)
  metrics.update(np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int))
  r = metrics.result()
  assert r['miou'] == pytest.approx(100.0)
  assert r['boundary_num_pixels'] == 0 and math.isnan(r['boundary_miou'])
  # A masked-out image contributes to neither matrix.
  label = np.stack([_stripes(4, 4, 2), _stripes(4, 4, 2)])
  metrics = sm.SegmentationMetrics(2, boundary_width=1)
  metrics.update(label, label, mask=np.array([True, False]))
  assert metrics.confusion.sum() == 16
  assert metrics.boundary_confusion.sum() == 8  # columns 1, 2 of image 0


# --- bad input --------------------------------------------------------------


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r'pred has shape \(4, 5\).*\(4, 4\)'):
    sm.confusion_matrix(np.zeros((4, 5), int), np.zeros((4, 4), int), 2)


def test_label_out_of_range_raises_with_values_and_fix():
  label = np.array([[0, 1, 7], [-1, IGN, 1]])
  pred = np.zeros_like(label)
  with pytest.raises(ValueError) as err:
    sm.confusion_matrix(pred, label, num_classes=3)
  msg = str(err.value)
  assert '-1, 7' in msg and '[0, 3)' in msg and 'ignore_index=255' in msg
  # Without ignore_index, 255 is itself out of range.
  with pytest.raises(ValueError, match='255'):
    sm.confusion_matrix(np.zeros((1, 1), int), np.full((1, 1), IGN), 3,
                        ignore_index=None)


def test_pred_out_of_range_raises():
  with pytest.raises(ValueError, match=r'pred has values .* 3\b'):
    sm.confusion_matrix(np.array([[0, 3]]), np.array([[0, 1]]), 3)


def test_float_inputs_and_bad_masks_raise():
  with pytest.raises(TypeError, match='integer class indices'):
    sm.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 2)
  with pytest.raises(TypeError, match='bool'):
    sm.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 2,
                        mask=np.ones((2, 2), int))
  with pytest.raises(ValueError, match='mask has shape'):
    sm.confusion_matrix(np.zeros((2, 3, 3), int), np.zeros((2, 3, 3), int), 2,
                        mask=np.ones((3,), bool))
  with pytest.raises(ValueError, match=r'\[H, W\] or \[B, H, W\]'):
    sm.confusion_matrix(np.zeros((1, 1, 2, 2), int),
                        np.zeros((1, 1, 2, 2), int), 2)


def test_bad_boundary_options_raise():
  with pytest.raises(ValueError, match='not both'):
    sm.SegmentationMetrics(2, boundary_width=3, boundary_width_ratio=0.02)
  with pytest.raises(ValueError, match='>= 0'):
    sm.SegmentationMetrics(2, boundary_width=-1)
  with pytest.raises(ValueError, match='> 0'):
    sm.SegmentationMetrics(2, boundary_width_ratio=0.0)
  with pytest.raises(ValueError, match='>= 0'):
    sm.boundary_mask(np.zeros((2, 2), int), 1.5)


def test_update_is_fast_on_512px_batch():
  # 8 images of 512x512 with 150 classes and d = 17 must take well under a
  # second, so thousands of validation images stay cheap.
  rng = np.random.default_rng(0)
  label = np.kron(rng.integers(0, 150, (8, 16, 16)),
                  np.ones((1, 32, 32), np.int64)).astype(np.uint8)
  pred = label.copy()
  metrics = sm.SegmentationMetrics(150, boundary_width=17)
  start = time.perf_counter()
  metrics.update(pred, label)
  elapsed = time.perf_counter() - start
  assert metrics.confusion.sum() == 8 * 512 * 512
  assert elapsed < 2.0, f'update took {elapsed:.2f} s for 8x512x512'
