"""Registry of the semantic-segmentation datasets and a uniform reader.

Every dataset is read as a random-access sequence of

  {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}

with class ids 0..num_classes-1 and 255 = ignore, whatever its TFDS
features are (Cityscapes labelIds are mapped to trainIds while reading).

| key | TFDS name | classes | source |
|---|---|---|---|
| 'ade20k' | ade20k | 150 | manual: ADEChallengeData2016.zip |
| 'cityscapes' | cityscapes/semantic_segmentation | 19 | manual: 2 zips |
| 'pascal_context' | pascal_context | 60 | manual: pcontext.tar / .zip |
| 'synthetic_scenes' | synthetic_scenes | see module | generated offline |

A key may name a TFDS config, e.g. 'synthetic_scenes/tiny'. Prepare a
dataset with `python -m lvtp_jax.data.prepare <key> --data_dir=<data_dir>`.

Typical use:

  source = open_segmentation_source('ade20k', 'validation', data_dir)
  example = source[0]  # {'image': [H, W, 3], 'segmentation': [H, W]}
"""

import dataclasses
import importlib
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from lvtp_jax.data import sources

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class SegmentationDataset:
  """How one segmentation dataset is stored in TFDS and read."""
  key: str  # Registry key, with an optional '/config'.
  tfds_name: str  # TFDS name (with config) passed to tfds.data_source.
  splits: Mapping[str, str]  # 'train' / 'validation' -> TFDS split name.
  num_classes: int
  class_names: Tuple[str, ...]  # Names of ids 0..num_classes-1.
  builder_module: Optional[str]  # Module registering our builder; None=stock.
  image_key: str = 'image'
  label_key: str = 'segmentation'
  # Applied to the uint8 [H, W, 1] label as read, e.g. labelId -> trainId.
  label_transform: Optional[Callable[[np.ndarray], np.ndarray]] = None
  ignore_index: int = IGNORE_INDEX
  source_note: Optional[str] = None  # See sources.prepare_hint.


_TRAIN_VALIDATION = {'train': 'train', 'validation': 'validation'}


def _ade20k() -> SegmentationDataset:
  from lvtp_jax.data import ade20k  # pylint: disable=g-import-not-at-top
  return SegmentationDataset(
      key='ade20k', tfds_name='ade20k', splits=_TRAIN_VALIDATION,
      num_classes=ade20k.NUM_CLASSES, class_names=ade20k.CLASS_NAMES,
      builder_module='lvtp_jax.data.ade20k')


def _cityscapes() -> SegmentationDataset:
  from lvtp_jax.data import cityscapes  # pylint: disable=g-import-not-at-top
  return SegmentationDataset(
      key='cityscapes', tfds_name=cityscapes.TFDS_NAME,
      splits=_TRAIN_VALIDATION, num_classes=len(cityscapes.CLASS_NAMES),
      class_names=cityscapes.CLASS_NAMES, builder_module=None,
      image_key=cityscapes.IMAGE_KEY, label_key=cityscapes.LABEL_KEY,
      label_transform=cityscapes.label_ids_to_train_ids)


def _pascal_context() -> SegmentationDataset:
  from lvtp_jax.data import pascal_context  # pylint: disable=g-import-not-at-top
  return SegmentationDataset(
      key='pascal_context', tfds_name='pascal_context',
      splits=_TRAIN_VALIDATION, num_classes=pascal_context.NUM_CLASSES,
      class_names=pascal_context.CLASS_NAMES,
      builder_module='lvtp_jax.data.pascal_context')


def _synthetic_scenes() -> SegmentationDataset:
  # Imported here so that this registry works without that module.
  from lvtp_jax.data import synthetic_scenes  # pylint: disable=g-import-not-at-top
  return SegmentationDataset(
      key='synthetic_scenes', tfds_name='synthetic_scenes',
      splits=_TRAIN_VALIDATION,
      num_classes=len(synthetic_scenes.CLASS_NAMES),
      class_names=tuple(synthetic_scenes.CLASS_NAMES),
      builder_module='lvtp_jax.data.synthetic_scenes',
      source_note=('synthetic_scenes is generated offline; nothing is '
                   'downloaded.'))


_REGISTRY: Dict[str, Callable[[], SegmentationDataset]] = {
    'ade20k': _ade20k,
    'cityscapes': _cityscapes,
    'pascal_context': _pascal_context,
    'synthetic_scenes': _synthetic_scenes,
}
DATASET_KEYS = tuple(_REGISTRY)


def get_dataset(key: str) -> SegmentationDataset:
  """The registry entry of `key` ('ade20k', 'synthetic_scenes/tiny', ...).

  Args:
    key: a registry key, optionally followed by '/<TFDS config>', which
      replaces the config of the entry's TFDS name.

  Returns:
    The dataset's `SegmentationDataset`.
  """
  base, _, config = key.partition('/')
  if base not in _REGISTRY:
    raise ValueError(
        f'unknown segmentation dataset {key!r}; known: {list(DATASET_KEYS)} '
        "(optionally with a TFDS config, e.g. 'synthetic_scenes/tiny').")
  dataset = _REGISTRY[base]()
  if config:
    tfds_name = f'{dataset.tfds_name.partition("/")[0]}/{config}'
    dataset = dataclasses.replace(dataset, key=key, tfds_name=tfds_name)
  return dataset


def register_builder(dataset: SegmentationDataset) -> None:
  """Imports the module that registers `dataset`'s TFDS builder, if any."""
  if dataset.builder_module:
    importlib.import_module(dataset.builder_module)


class SegmentationSource(Sequence):
  """A TFDS source seen as {'image', 'segmentation'} examples.

  Indexing takes one int (grain and the batching code read examples one by
  one); `dataset_info` is the underlying `tfds.core.DatasetInfo`.
  """

  def __init__(self, source: Sequence[Dict[str, Any]],
               dataset: SegmentationDataset):
    self._source = source
    self.dataset = dataset

  @property
  def dataset_info(self) -> Any:
    return self._source.dataset_info

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    """Example `index` as dict(image=uint8 [H, W, 3], segmentation=[H, W])."""
    index = operator.index(index)
    n = len(self)
    if not -n <= index < n:
      # Sequence.__iter__ stops at IndexError; tfds sources do not raise it.
      raise IndexError(f'index {index} out of range for {n} examples.')
    example = self._source[index % n]
    label = np.asarray(example[self.dataset.label_key])
    if self.dataset.label_transform is not None:
      label = self.dataset.label_transform(label)
    if label.ndim == 3:
      label = label[:, :, 0]
    return dict(image=np.asarray(example[self.dataset.image_key]),
                segmentation=label)


def open_segmentation_source(key: str,
                             split: str,
                             data_dir: Optional[str] = None
                            ) -> SegmentationSource:
  """Opens a prepared segmentation split for random access (no TensorFlow).

  Args:
    key: registry key, e.g. 'ade20k', 'cityscapes', 'pascal_context',
      'synthetic_scenes' or 'synthetic_scenes/tiny'.
    split: 'train' or 'validation', or a TFDS slice such as
      'validation[:100]'.
    data_dir: TFDS data_dir; None means TFDS_DATA_DIR or
      ~/tensorflow_datasets.

  Returns:
    A `SegmentationSource` of dict(image=uint8 [H, W, 3],
    segmentation=uint8 [H, W]) examples.

  Raises:
    sources.DatasetNotPreparedError: the dataset is not prepared under
      data_dir; the message says where manual downloads go and how to
      prepare it.
  """
  dataset = get_dataset(key)
  register_builder(dataset)
  source = sources.open_source(
      dataset.tfds_name, dataset.splits.get(split, split), data_dir,
      imports=dataset.builder_module,
      prepare_command=(
          f'python -m lvtp_jax.data.prepare {key} --data_dir={{data_dir}}'),
      source_note=dataset.source_note)
  return SegmentationSource(source, dataset)
