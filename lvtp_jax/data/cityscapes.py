"""Cityscapes semantic segmentation: TFDS labelIds -> the 19 training ids.

No builder of our own: TFDS 'cityscapes/semantic_segmentation' reads the
official archives (a manual download: leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com, placed in
<data_dir>/downloads/manual). Its 'segmentation_label' is the gtFine
`*_labelIds.png` map, i.e. the 34 raw label ids, while Segmenter and mmseg
train and evaluate on the 19 `trainId`s of cityscapesScripts
(`cityscapesscripts/helpers/labels.py`, the `trainId` column; every label with
trainId 255 or -1 there is ignored). `label_ids_to_train_ids` converts the
labels at read time, so the prepared TFDS files stay the stock ones:

  source = segmentation_datasets.open_segmentation_source(
      'cityscapes', 'validation', data_dir)
  source[0]  # {'image': uint8 [1024, 2048, 3],
             #  'segmentation': uint8 [1024, 2048] trainIds}
"""

import numpy as np

TFDS_NAME = 'cityscapes/semantic_segmentation'
IMAGE_KEY = 'image_left'
LABEL_KEY = 'segmentation_label'
IGNORE_INDEX = 255

# labelId -> trainId for the 19 evaluated classes, from cityscapesScripts
# `labels.py`. All other ids (unlabeled, ego vehicle, rectification border,
# out of roi, static, dynamic, ground, parking, rail track, guard rail,
# bridge, tunnel, polegroup, caravan, trailer, license plate) are ignored.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

# Names of trainIds 0..18 (Segmenter `segm/data/config/cityscapes.yml`).
CLASS_NAMES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
    'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
    'truck', 'bus', 'train', 'motorcycle', 'bicycle')


def _lookup_table() -> np.ndarray:
  """uint8 [256]: trainId of every possible uint8 labelId."""
  table = np.full((256,), IGNORE_INDEX, np.uint8)
  for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  table.setflags(write=False)
  return table


# A full 256-entry table makes the mapping one gather, and also maps ids that
# cannot occur in gtFine (e.g. 255 from padding) to ignore.
_LABEL_ID_TO_TRAIN_ID_TABLE = _lookup_table()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps Cityscapes labelIds to trainIds (0..18, 255 = ignore).

  Args:
    label_ids: uint8 array of any shape, e.g. [H, W] or [H, W, 1].

  Returns:
    uint8 array of the same shape.
  """
  label_ids = np.asarray(label_ids)
  if label_ids.dtype != np.uint8:
    raise ValueError(
        f'Cityscapes labelIds must be uint8 (as decoded from gtFine '
        f'*_labelIds.png), got dtype {label_ids.dtype}.')
  return _LABEL_ID_TO_TRAIN_ID_TABLE[label_ids]
