"""Semantic segmentation metrics: mIoU, aAcc, mean accuracy, boundary mIoU.

Everything here runs in NumPy on the host and accumulates int64 counts, so
predictions must be brought to the host (e.g. `np.asarray(logits.argmax(-1))`)
first.

Protocol (specs/weights_and_data.md §2.6, the official Segmenter evaluation,
which calls mmseg 0.x `mean_iou`):

* Pixels whose ground truth is `ignore_index` (255) are dropped before
  anything is counted.
* Intersections / unions are **summed over the whole dataset**, then
  IoU_c = sum(TP_c) / sum(TP_c + FP_c + FN_c). This is NOT the mean of
  per-image mIoUs. A class whose union is 0 over the dataset (absent from both
  the ground truth and the predictions) gets NaN and is left out of the mean
  (nanmean). A class that only appears in the predictions has IoU 0 and counts.
* aAcc ("pixel_accuracy" here) = sum_c TP_c / number of labelled pixels.
  Mean class accuracy = nanmean_c TP_c / (TP_c + FN_c).
* All results are in percent. Segmenter rounds mIoU to 2 decimals when it
  prints it; we keep full precision and leave the rounding to the reports.

Boundary mIoU (ours; motivated by specs/lvtp.md: pruning should spare edge
tokens, and the paper claims gains "in complex edge regions"):

* A labelled pixel p is a *boundary pixel* iff some labelled pixel q with
  Chebyshev (square-window) distance max(|dy|, |dx|) <= d has a different
  label. Both sides of an edge are in the band, so a straight edge between two
  classes gives a band 2d pixels wide. This equals the union over classes of
  the "inner boundary" of Cheng et al., "Boundary IoU" (CVPR 2021), which
  erodes each mask d times with a 3x3 kernel (i.e. Chebyshev distance d).
* Ignore pixels are never in the band, and a change to or from ignore does
  not create a boundary (e.g. ADE20K's unlabelled "other" regions are not
  object edges). Likewise the image frame is not a boundary (unlike the
  Boundary IoU reference code, which pads masks with background), because for
  semantic maps the frame is not a class edge.
* d = 0 gives an empty band.
* Default d: 2% of the image diagonal, rounded, at least 1 pixel, which is
  the Boundary IoU paper's dilation ratio. That gives 3 px on the 96x96
  synthetic images, 4 px on 128x128, and 17 px on a 512x683 ADE20K image, so
  the band covers the same fraction of the image at every resolution. Pass a
  fixed `boundary_width` (pixels) instead to override it.
* Boundary mIoU is the mIoU of a second confusion matrix that counts only
  band pixels, accumulated over the dataset exactly like the main one.
"""

import math
from typing import Any, Dict, Optional

import numpy as np
from scipy import ndimage

# Cheng et al. 2021, "Boundary IoU": d = dilation_ratio * image diagonal, with
# dilation_ratio 0.02 in their reference implementation.
DEFAULT_BOUNDARY_WIDTH_RATIO = 0.02


def _as_int_array(x: Any, name: str) -> np.ndarray:
  """np.asarray(x), checked to be an integer label/class-index map."""
  arr = np.asarray(x)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(
        f'{name} must hold integer class indices, got dtype {arr.dtype}. '
        'Pass argmax class maps (e.g. logits.argmax(-1).astype(np.int32)), '
        'not logits or probabilities.')
  if arr.ndim not in (2, 3):
    raise ValueError(
        f'{name} must have shape [H, W] or [B, H, W], got {arr.shape}. '
        'Squeeze channel dimensions of size 1 before calling.')
  return arr


def _as_batch(x: np.ndarray) -> np.ndarray:
  """[H, W] -> [1, H, W]; [B, H, W] unchanged."""
  return x[None] if x.ndim == 2 else x


def _pixel_mask(mask: Any, shape: tuple) -> np.ndarray:
  """Expands an optional mask to a bool [B, H, W] array.

  Args:
    mask: None, a bool array with the label's shape ([B, H, W] or [H, W]), or
      a bool [B] array (one flag per image, label [B, H, W] only).
    shape: the label's shape.

  Returns:
    bool array with `shape`, or None when `mask` is None.
  """
  if mask is None:
    return None
  mask = np.asarray(mask)
  if mask.dtype != np.bool_:
    # An int array here is most likely a label map passed by mistake.
    raise TypeError(f'mask must be a bool array, got dtype {mask.dtype}. '
                    'Use e.g. mask=(valid != 0).')
  if mask.shape == tuple(shape):
    return mask
  if len(shape) == 3 and mask.shape == (shape[0],):
    return np.broadcast_to(mask[:, None, None], shape)
  raise ValueError(
      f'mask has shape {mask.shape}; expected the label shape {tuple(shape)}'
      + (f' or one flag per image ({shape[0]},).' if len(shape) == 3 else '.'))


def _check_range(values: np.ndarray, num_classes: int, name: str,
                 ignore_index: Optional[int]) -> None:
  """Raises if some counted value is outside [0, num_classes)."""
  if values.size == 0:
    return
  lo, hi = int(values.min()), int(values.max())
  if lo >= 0 and hi < num_classes:
    return
  bad = np.unique(values[(values < 0) | (values >= num_classes)])
  shown = ', '.join(str(v) for v in bad[:10])
  if bad.size > 10:
    shown += ' ...'
  if name == 'label':
    fix = (f'Map labels to [0, {num_classes}) or to ignore_index='
           f'{ignore_index} (e.g. ADE20K reduce_zero_label: 0 -> 255, '
           'others - 1), or fix num_classes.')
  else:
    fix = (f'Predictions must be class indices in [0, {num_classes}); check '
           'num_classes and that pred is an argmax over the class axis.')
  raise ValueError(f'{name} has values outside [0, {num_classes}) at counted '
                   f'pixels: {shown}. {fix}')


def confusion_matrix(pred: Any,
                     label: Any,
                     num_classes: int,
                     ignore_index: Optional[int] = 255,
                     mask: Any = None) -> np.ndarray:
  """Confusion matrix of one batch (rows: ground truth, columns: prediction).

  Sum the results of several batches to get the dataset-level matrix (mmseg
  0.x `mean_iou` sums intersections/unions over the dataset).

  Args:
    pred: int [B, H, W] or [H, W], predicted class per pixel.
    label: int, same shape as `pred`, ground-truth class per pixel.
    num_classes: C.
    ignore_index: label value of unlabelled pixels, which are not counted
      (mmseg / Segmenter: 255). None: every pixel is labelled.
    mask: optional bool, same shape as `label`, or bool [B] (per image):
      pixels / images where it is False are not counted.

  Returns:
    np.int64 [C, C]; entry [g, p] = number of counted pixels with label g and
    prediction p.

  Raises:
    TypeError: non-integer pred/label or non-bool mask.
    ValueError: shape mismatch, or a counted pixel whose label (not
      ignore_index) or prediction is outside [0, C). Out-of-range labels are
      an error rather than silently dropped, since they usually mean a missing
      label remapping (e.g. ADE20K's reduce_zero_label) that would otherwise
      bias the metric without notice.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  pred = _as_int_array(pred, 'pred')
  label = _as_int_array(label, 'label')
  if pred.shape != label.shape:
    raise ValueError(
        f'pred has shape {pred.shape} but label has shape {label.shape}. '
        'Resize the prediction (logits, bilinear) to the label size before '
        'the argmax, as Segmenter does, so that they match pixel for pixel.')
  keep = None if ignore_index is None else label != ignore_index
  pixel_mask = _pixel_mask(mask, label.shape)
  if pixel_mask is not None:
    keep = pixel_mask if keep is None else keep & pixel_mask
  if keep is None:
    lab, prd = label.ravel(), pred.ravel()
  else:
    lab, prd = label[keep], pred[keep]
  _check_range(lab, num_classes, 'label', ignore_index)
  _check_range(prd, num_classes, 'pred', ignore_index)
  # One bincount over g * C + p is much faster than np.add.at or a
  # per-class loop (thousands of 512x512 images).
  flat = lab.astype(np.int64) * num_classes + prd.astype(np.int64)
  counts = np.bincount(flat, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den as float64, NaN where den == 0 (without RuntimeWarnings)."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den > 0)
  return out


def _nanmean(x: np.ndarray) -> float:
  """Mean over the non-NaN entries; NaN (no warning) if there are none."""
  finite = x[~np.isnan(x)]
  return float(finite.mean()) if finite.size else float('nan')


def per_class_iou(cm: np.ndarray) -> np.ndarray:
  """IoU_c = TP / (TP + FP + FN) from a confusion matrix.

  Args:
    cm: [..., C, C], rows ground truth, columns prediction (leading axes:
      several matrices at once, e.g. bootstrap resamples).

  Returns:
    float64 [..., C] in [0, 1]; NaN for classes with zero union (absent from
    both ground truth and predictions), as in mmseg 0.x `mean_iou`.
  """
  cm = np.asarray(cm)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  union = cm.sum(axis=-2) + cm.sum(axis=-1) - tp
  return _safe_div(tp, union)


def mean_iou(cm: np.ndarray) -> np.ndarray:
  """mIoU in percent of [..., C, C] confusion matrices -> [...]: the nanmean
  of per_class_iou, as metrics_from_confusion's `miou` (NaN where no class
  has a union)."""
  iou = per_class_iou(cm)
  defined = ~np.isnan(iou)
  count = defined.sum(axis=-1)
  total = np.where(defined, iou, 0.0).sum(axis=-1)
  return 100.0 * _safe_div(total, count)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
  """Acc_c = TP / (TP + FN) (recall); NaN for classes with no GT pixels.

  Args:
    cm: int [C, C], rows ground truth, columns prediction.

  Returns:
    float64 [C] in [0, 1].
  """
  cm = np.asarray(cm)
  return _safe_div(np.diag(cm), cm.sum(axis=1))


def metrics_from_confusion(cm: np.ndarray) -> Dict[str, Any]:
  """mIoU, aAcc and mean class accuracy (percent) of a confusion matrix.

  Args:
    cm: int [C, C], rows ground truth, columns prediction.

  Returns:
    dict with
      miou: nanmean of per_class_iou, percent.
      pixel_accuracy: mmseg "aAcc" = trace / number of counted pixels, percent.
      mean_accuracy: nanmean of per_class_accuracy, percent.
      per_class_iou, per_class_accuracy: lists of C floats, percent, NaN for
        classes that are undefined (see per_class_iou / per_class_accuracy).
      num_pixels: number of counted pixels (int).
    If nothing was counted, every value except num_pixels (0) is NaN; this
    function does not raise (SegmentationMetrics.result decides).
  """
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'cm must be square [C, C], got shape {cm.shape}.')
  iou = per_class_iou(cm)
  acc = per_class_accuracy(cm)
  total = int(cm.sum())
  return dict(
      miou=float(mean_iou(cm)),
      pixel_accuracy=100.0 * float(_safe_div(np.trace(cm), total)),
      mean_accuracy=100.0 * _nanmean(acc),
      per_class_iou=(100.0 * iou).tolist(),
      per_class_accuracy=(100.0 * acc).tolist(),
      num_pixels=total)


def boundary_width_from_ratio(height: int, width: int,
                              ratio: float = DEFAULT_BOUNDARY_WIDTH_RATIO
                              ) -> int:
  """Band width d in pixels = round(ratio * image diagonal), at least 1.

  Boundary IoU reference code: `dilation = int(round(ratio * diag))`, and 1
  if that is < 1.

  Args:
    height: H.
    width: W.
    ratio: fraction of the diagonal sqrt(H^2 + W^2); > 0.

  Returns:
    int d >= 1.
  """
  if not ratio > 0:
    raise ValueError(f'boundary_width_ratio must be > 0, got {ratio}.')
  return max(1, int(round(ratio * math.hypot(height, width))))


def boundary_mask(label: Any, width: int,
                  ignore_index: Optional[int] = 255) -> np.ndarray:
  """Ground-truth boundary band (see the module docstring for the rule).

  Vectorised: a labelled pixel has a different labelled neighbour within
  Chebyshev distance d iff the max or the min of the labels over its
  (2d+1)x(2d+1) window (ignore pixels taken out) differs from its own label.
  The window is (1, 2d+1, 2d+1), so images in a batch never see each other,
  and pixels outside the image are filled with values that can never win
  (the image frame is not a boundary).

  Args:
    label: int [B, H, W] or [H, W] ground truth.
    width: d >= 0 in pixels; 0 gives an empty band, 1 marks pixels with an
      8-neighbour of another class.
    ignore_index: unlabelled value (never in the band, never creates one);
      None if every pixel is labelled.

  Returns:
    bool, same shape as `label`.
  """
  label = _as_int_array(label, 'label')
  if isinstance(width, bool) or int(width) != width or width < 0:
    raise ValueError(f'boundary width must be an int >= 0, got {width!r}.')
  width = int(width)
  lab = _as_batch(label).astype(np.int64)
  valid = (np.ones(lab.shape, bool) if ignore_index is None
           else lab != ignore_index)
  if width == 0 or not valid.any():
    return np.zeros(label.shape, bool)
  # Sentinels below / above every real label so ignore pixels and the
  # outside of the image never become the window max / min.
  low = int(lab[valid].min()) - 1
  high = int(lab[valid].max()) + 1
  size = (1, 2 * width + 1, 2 * width + 1)
  win_max = ndimage.maximum_filter(np.where(valid, lab, low), size=size,
                                   mode='constant', cval=low)
  win_min = ndimage.minimum_filter(np.where(valid, lab, high), size=size,
                                   mode='constant', cval=high)
  band = valid & ((win_max != lab) | (win_min != lab))
  return band.reshape(label.shape)


class SegmentationMetrics:
  """Dataset-level segmentation metrics accumulated over batches.

  Usage:
    metrics = SegmentationMetrics(num_classes=150)
    for image, label in data:
      metrics.update(np.asarray(predict(image)), label)
    row.update(metrics.result())

  Attributes:
    confusion: np.int64 [C, C], all counted pixels.
    boundary_confusion: np.int64 [C, C], counted pixels in the GT boundary
      band only.
  """

  def __init__(self,
               num_classes: int,
               ignore_index: Optional[int] = 255,
               boundary_width: Optional[int] = None,
               boundary_width_ratio: Optional[float] = None,
               per_image: bool = False):
    """Creates empty accumulators.

    Args:
      num_classes: C.
      ignore_index: ground-truth value that is not counted (None: none).
      boundary_width: fixed band width d in pixels (>= 0).
      boundary_width_ratio: d as a fraction of each batch's image diagonal
        (see boundary_width_from_ratio). Give at most one of the two; with
        neither, the ratio DEFAULT_BOUNDARY_WIDTH_RATIO (0.02) is used.
      per_image: also keep both matrices of every image
        (image_confusions(); 2 x N x C^2 int64 on the host: 0.8 MB for 500
        images of 10 classes, 720 MB for ADE20K's 2000 of 150), for the
        paired bootstrap of lvtp_jax.evaluation.paired.
    """
    if boundary_width is not None and boundary_width_ratio is not None:
      raise ValueError(
          'Give boundary_width (pixels) or boundary_width_ratio (fraction of '
          f'the diagonal), not both; got {boundary_width} and '
          f'{boundary_width_ratio}.')
    if boundary_width is not None and (int(boundary_width) != boundary_width
                                       or boundary_width < 0):
      raise ValueError(
          f'boundary_width must be an int >= 0, got {boundary_width!r}.')
    if boundary_width is None and boundary_width_ratio is None:
      boundary_width_ratio = DEFAULT_BOUNDARY_WIDTH_RATIO
    if boundary_width_ratio is not None:
      boundary_width_from_ratio(1, 1, boundary_width_ratio)  # Validates > 0.
    self.num_classes = int(num_classes)
    self.ignore_index = ignore_index
    self.boundary_width = boundary_width
    self.boundary_width_ratio = boundary_width_ratio
    self.per_image = per_image
    self.reset()

  def reset(self) -> None:
    """Zeroes both confusion matrices."""
    c = self.num_classes
    self.confusion = np.zeros((c, c), np.int64)
    self.boundary_confusion = np.zeros((c, c), np.int64)
    self._images = []

  def width_for(self, height: int, width: int) -> int:
    """Band width d (pixels) used for images of size height x width."""
    if self.boundary_width is not None:
      return int(self.boundary_width)
    return boundary_width_from_ratio(height, width, self.boundary_width_ratio)

  def update(self, pred: Any, label: Any, mask: Any = None) -> None:
    """Adds one batch.

    Args:
      pred: int [B, H, W] or [H, W] predicted classes (NumPy, on the host).
      label: int, same shape, ground truth.
      mask: optional bool, label-shaped or [B]; False pixels / images are
        not counted (e.g. padding added to batch images of different sizes).
    """
    cm = confusion_matrix(pred, label, self.num_classes, self.ignore_index,
                          mask)
    label = np.asarray(label)
    h, w = label.shape[-2:]
    band = boundary_mask(label, self.width_for(h, w), self.ignore_index)
    pixel_mask = _pixel_mask(mask, label.shape)
    if pixel_mask is not None:
      band &= pixel_mask
    # Range/shape checks already passed above, so this cannot raise anew.
    bcm = confusion_matrix(pred, label, self.num_classes, self.ignore_index,
                           band)
    self.confusion += cm
    self.boundary_confusion += bcm
    if self.per_image:
      counted = (np.ones(label.shape, bool) if pixel_mask is None
                 else pixel_mask)
      for p, l, m, b in zip(_as_batch(np.asarray(pred)), _as_batch(label),
                            _as_batch(counted), _as_batch(band)):
        full = confusion_matrix(p, l, self.num_classes, self.ignore_index, m)
        if full.any():
          self._images.append((full, confusion_matrix(
              p, l, self.num_classes, self.ignore_index, b)))

  def image_confusions(self):
    """(full, band): int64 [N, C, C] each, the two confusion matrices of
    every image added since the last reset (per_image=True), in order.
    Images with no counted pixel (batch padding, all ignored) are left out:
    they add nothing to either matrix."""
    if not self.per_image:
      raise ValueError('image_confusions() needs '
                       'SegmentationMetrics(per_image=True).')
    c = self.num_classes
    if not self._images:
      empty = np.zeros((0, c, c), np.int64)
      return empty, empty
    full, band = zip(*self._images)
    return np.stack(full), np.stack(band)

  def result(self) -> Dict[str, Any]:
    """Metrics over everything added since the last reset, in percent.

    Returns:
      dict with miou, pixel_accuracy (aAcc), mean_accuracy, per_class_iou,
      per_class_accuracy, num_pixels (see metrics_from_confusion), plus
      boundary_miou, boundary_pixel_accuracy, boundary_per_class_iou and
      boundary_num_pixels from the band-only matrix. boundary_* values are
      NaN if the band held no pixel (e.g. every image is a single class);
      boundary_num_pixels = 0 then shows why.

    Raises:
      ValueError: no labelled pixel was counted at all (no update, or every
        pixel ignored / masked), so every class IoU is NaN and mIoU is
        undefined. That is almost always an evaluation bug, so it is not
        returned as a NaN that could end up in a results table unnoticed.
    """
    if self.confusion.sum() == 0:
      raise ValueError(
          'No labelled pixel was counted, so mIoU is undefined: call update() '
          'with at least one pixel whose label is not ignore_index='
          f'{self.ignore_index} and whose mask is True.')
    out = metrics_from_confusion(self.confusion)
    band = metrics_from_confusion(self.boundary_confusion)
    out.update(
        boundary_miou=band['miou'],
        boundary_pixel_accuracy=band['pixel_accuracy'],
        boundary_per_class_iou=band['per_class_iou'],
        boundary_num_pixels=band['num_pixels'])
    return out
