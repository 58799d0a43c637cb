"""Tests of the segmentation dataset builders, registry and reader.

The ADE20K and PASCAL-Context builders are run on tiny archives written in
the real on-disk layouts (ADEChallengeData2016.zip; Segmenter's VOC2010
pcontext folder as a tar), prepared with the project's CLI in a subprocess
(preparing imports tensorflow, which this process never needs) and read
back through `open_segmentation_source`. Cityscapes uses
`tfds.testing.mock_data`.
"""

import io
import os
import subprocess
import sys
import tarfile
import zipfile

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from lvtp_jax.data import ade20k
from lvtp_jax.data import cityscapes
from lvtp_jax.data import pascal_context
from lvtp_jax.data import segmentation_datasets as sd
from lvtp_jax.data import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (stem, height, width) of the tiny ADE20K archive; distinct sizes make every
# example recognisable.
_ADE_FILES = {
    'training': [('ADE_train_00000001', 21, 30), ('ADE_train_00000002', 17, 9),
                 ('ADE_train_00000003', 12, 25)],
    'validation': [('ADE_val_00000001', 19, 14), ('ADE_val_00000002', 8, 31)],
}
# PASCAL-Context ids per list file, plus an image no list names.
_PC_LISTS = {'train': ['2008_000002', '2008_000007'],
             'val': ['2008_000009', '2010_000004']}
_PC_UNLISTED = '2008_000003'


def _jpeg(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _png(array, palette=False):
  """PNG bytes of uint8 [H, W] ('L', or 'P' with a palette) or [H, W, 3]."""
  pil = Image.fromarray(array)
  if palette:
    # Like VOC masks: the pixel values are indices into a 256-entry palette.
    pil.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tobytes())
    assert pil.mode == 'P'
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  return buffer.getvalue()


def _decode_jpeg(data):
  with Image.open(io.BytesIO(data)) as pil:
    return np.asarray(pil.convert('RGB'))


def _ade_example(seed, height, width):
  """(jpeg bytes, official annotation uint8 [H, W]) with 0, 1 and 150."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  annotation = rng.integers(0, 151, (height, width), np.uint8)
  annotation[0, :3] = (0, 1, 150)
  return _jpeg(image), annotation


def _write_ade_zip(path):
  """Writes ADEChallengeData2016.zip; returns {folder: [(stem, jpeg, ann)]}."""
  contents = {}
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('ADEChallengeData2016/objectInfo150.txt', 'Idx\tName\n')
    seed = 0
    for folder, files in _ADE_FILES.items():
      contents[folder] = []
      # Written out of order: the builder must sort by file name.
      for stem, height, width in reversed(files):
        seed += 1
        jpeg, annotation = _ade_example(seed, height, width)
        zf.writestr(f'ADEChallengeData2016/images/{folder}/{stem}.jpg', jpeg)
        zf.writestr(f'ADEChallengeData2016/annotations/{folder}/{stem}.png',
                    _png(annotation))
        contents[folder].append((stem, jpeg, annotation))
      contents[folder].sort()
  return contents


def _add_tar_member(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_pcontext_tar(path, palette=True):
  """Writes pcontext.tar as Segmenter lays it out; returns {id: (jpeg, lbl)}."""
  root = 'pcontext/VOCdevkit/VOC2010/'
  contents = {}
  rng = np.random.default_rng(7)
  with tarfile.open(path, 'w') as tar:
    ids = sorted(sum(_PC_LISTS.values(), []) + [_PC_UNLISTED])
    for i, image_id in enumerate(ids):
      height, width = 10 + i, 20 - i
      jpeg = _jpeg(rng.integers(0, 256, (height, width, 3), np.uint8))
      label = rng.integers(0, 60, (height, width), np.uint8)
      label[0, :3] = (0, 59, 255)
      _add_tar_member(tar, f'{root}JPEGImages/{image_id}.jpg', jpeg)
      _add_tar_member(tar, f'{root}SegmentationClassContext/{image_id}.png',
                      _png(label, palette))
      contents[image_id] = (jpeg, label)
    for list_name, ids in _PC_LISTS.items():
      _add_tar_member(tar, f'{root}ImageSets/SegmentationContext/{list_name}'
                      '.txt', ''.join(f'{i}\n' for i in ids).encode())
    # VOC's own segmentation lists must not be picked up.
    _add_tar_member(tar, f'{root}ImageSets/Segmentation/train.txt',
                    f'{_PC_UNLISTED}\n'.encode())
  return contents


def _run_prepare(args):
  return subprocess.run(
      [sys.executable, '-m', 'lvtp_jax.data.prepare'] + args,
      capture_output=True, text=True, check=False, cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """data_dir with ade20k and pascal_context prepared from tiny archives."""
  data_dir = tmp_path_factory.mktemp('tfds')
  manual_dir = data_dir / 'downloads' / 'manual'
  manual_dir.mkdir(parents=True)
  ade = _write_ade_zip(manual_dir / 'ADEChallengeData2016.zip')
  pcontext = _write_pcontext_tar(manual_dir / 'pcontext.tar')
  result = _run_prepare(['ade20k', 'pascal_context',
                         f'--data_dir={data_dir}'])
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(data_dir=str(data_dir), ade=ade, pcontext=pcontext)


# ----------------------------------------------------------------------------
# ADE20K.
# ----------------------------------------------------------------------------


def test_reduce_zero_label_is_mmseg_convention():
  official = np.array([[0, 1, 2], [75, 149, 150]], np.uint8)
  np.testing.assert_array_equal(
      ade20k.reduce_zero_label(official),
      np.array([[255, 0, 1], [74, 148, 149]], np.uint8))
  with pytest.raises(ValueError, match='not in 0..150'):
    ade20k.reduce_zero_label(np.array([151], np.uint8))


@pytest.mark.parametrize('split,folder', [('train', 'training'),
                                          ('validation', 'validation')])
def test_ade20k_is_read_back_exactly(prepared, split, folder):
  source = sd.open_segmentation_source('ade20k', split, prepared['data_dir'])
  expected = prepared['ade'][folder]
  assert len(source) == len(expected)
  # Shuffling is disabled: index i is the i-th file name.
  for i, (_, jpeg, annotation) in enumerate(expected):
    example = source[i]
    assert set(example) == {'image', 'segmentation'}
    assert example['image'].dtype == np.uint8
    np.testing.assert_array_equal(example['image'], _decode_jpeg(jpeg))
    segmentation = example['segmentation']
    assert segmentation.dtype == np.uint8
    assert segmentation.shape == annotation.shape
    np.testing.assert_array_equal(
        segmentation,
        np.where(annotation == 0, 255, annotation.astype(np.int32) - 1))
    assert segmentation[0, :3].tolist() == [255, 0, 149]
  assert len(list(source)) == len(expected)  # Iteration stops at the end.
  assert source.dataset.num_classes == 150


def test_ade20k_features_and_ids(prepared):
  raw = tfds.data_source('ade20k', split='validation',
                         data_dir=prepared['data_dir'])
  # data_source returns Text features as bytes.
  assert [raw[i]['image_id'] for i in range(len(raw))] == [
      b'ADE_val_00000001', b'ADE_val_00000002']
  assert raw[0]['segmentation'].shape == (19, 14, 1)


def test_ade20k_archive_errors(tmp_path):
  builder = ade20k.Ade20k(data_dir=str(tmp_path))

  class _Manager:
    manual_dir = epath.Path(tmp_path)

  with pytest.raises(FileNotFoundError) as error:
    builder._split_generators(_Manager())  # pylint: disable=protected-access
  assert 'ADEChallengeData2016.zip' in str(error.value)
  assert ade20k.ARCHIVE_SHA1 in str(error.value)

  archive = tmp_path / 'ADEChallengeData2016.zip'
  with zipfile.ZipFile(archive, 'w') as zf:
    zf.writestr('ADEChallengeData2016/images/training/a.jpg',
                _jpeg(np.zeros((4, 4, 3), np.uint8)))
    zf.writestr('ADEChallengeData2016/annotations/training/a.png',
                _png(np.zeros((4, 4, 3), np.uint8)))
    zf.writestr('ADEChallengeData2016/images/validation/b.jpg',
                _jpeg(np.zeros((4, 4, 3), np.uint8)))
  generate = builder._generate_examples  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="mode 'RGB'"):
    list(generate(epath.Path(archive), 'training'))
  with pytest.raises(ValueError, match=r"no partner \(e.g. \['b'\]\)"):
    list(generate(epath.Path(archive), 'validation'))


# ----------------------------------------------------------------------------
# PASCAL-Context.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('split,list_name', [('train', 'train'),
                                             ('validation', 'val')])
def test_pascal_context_is_read_back_exactly(prepared, split, list_name):
  source = sd.open_segmentation_source('pascal_context', split,
                                       prepared['data_dir'])
  ids = _PC_LISTS[list_name]
  assert len(source) == len(ids)
  for i, image_id in enumerate(ids):
    jpeg, label = prepared['pcontext'][image_id]
    example = source[i]
    np.testing.assert_array_equal(example['image'], _decode_jpeg(jpeg))
    np.testing.assert_array_equal(example['segmentation'], label)
    assert example['segmentation'][0, :3].tolist() == [0, 59, 255]
  assert source.dataset.num_classes == 60


def test_pascal_context_zip_and_label_checks(tmp_path):
  builder = pascal_context.PascalContext(data_dir=str(tmp_path / 'data'))
  generate = builder._generate_examples  # pylint: disable=protected-access
  # The same layout as a zip, with 'L' masks, gives the same examples.
  tar_path = tmp_path / 'pcontext.tar'
  contents = _write_pcontext_tar(tar_path, palette=False)
  zip_path = tmp_path / 'pcontext.zip'
  with tarfile.open(tar_path) as tar, zipfile.ZipFile(zip_path, 'w') as zf:
    for member in tar.getmembers():
      zf.writestr(member.name, tar.extractfile(member).read())
  examples = list(generate(epath.Path(zip_path), 'val.txt'))
  assert [key for key, _ in examples] == _PC_LISTS['val']
  for key, example in examples:
    np.testing.assert_array_equal(example['segmentation'][:, :, 0],
                                  contents[key][1])
    assert example['image'] == contents[key][0]  # JPEG bytes, unchanged.

  with pytest.raises(ValueError, match=r'values \[60\]'):
    pascal_context.check_labels(np.array([[0, 60, 255]], np.uint8), 'x.png')

  gz_path = tmp_path / 'pcontext.tar.gz'
  with tarfile.open(gz_path, 'w:gz') as tar:
    _add_tar_member(tar, 'x.txt', b'x')
  with pytest.raises(ValueError, match='not an uncompressed tar'):
    list(generate(epath.Path(gz_path), 'val.txt'))

  class _Manager:
    manual_dir = epath.Path(tmp_path / 'empty')

  with pytest.raises(FileNotFoundError) as error:
    builder._split_generators(_Manager())  # pylint: disable=protected-access
  assert 'pcontext.tar' in str(error.value)
  assert 'prepare_pcontext.py' in str(error.value)


# ----------------------------------------------------------------------------
# Cityscapes.
# ----------------------------------------------------------------------------

# cityscapesScripts helpers/labels.py: (labelId, trainId) of the 19 classes;
# every other labelId is ignored.
_CITYSCAPES_TRAIN_IDS = [
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7),
    (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13), (27, 14),
    (28, 15), (31, 16), (32, 17), (33, 18)]


def _reference_train_ids(label_ids):
  table = dict(_CITYSCAPES_TRAIN_IDS)
  return np.vectorize(lambda v: table.get(int(v), 255),
                      otypes=[np.uint8])(label_ids)


def test_cityscapes_label_ids_to_train_ids():
  every_id = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  mapped = cityscapes.label_ids_to_train_ids(every_id)
  assert mapped.shape == every_id.shape and mapped.dtype == np.uint8
  np.testing.assert_array_equal(mapped, _reference_train_ids(every_id))
  assert sorted(set(mapped.ravel().tolist())) == list(range(19)) + [255]
  with pytest.raises(ValueError, match='must be uint8'):
    cityscapes.label_ids_to_train_ids(np.arange(4))


def test_cityscapes_adapter_under_mock_data():
  with tfds.testing.mock_data(num_examples=2,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    source = sd.open_segmentation_source('cityscapes', 'validation')
    raw = tfds.data_source('cityscapes/semantic_segmentation',
                           split='validation')
    assert len(source) == 2
    for i in range(2):
      example = source[i]
      assert set(example) == {'image', 'segmentation'}
      assert example['image'].shape == (1024, 2048, 3)
      assert example['segmentation'].shape == (1024, 2048)
      np.testing.assert_array_equal(example['image'], raw[i]['image_left'])
      np.testing.assert_array_equal(
          example['segmentation'],
          _reference_train_ids(raw[i]['segmentation_label'][:, :, 0]))
  assert source.dataset.num_classes == 19


# ----------------------------------------------------------------------------
# Registry, reader and errors.
# ----------------------------------------------------------------------------


def test_registry_entries():
  from lvtp_jax.data import synthetic_scenes  # pylint: disable=g-import-not-at-top
  expected = {'ade20k': ('ade20k', 150),
              'pascal_context': ('pascal_context', 60),
              'cityscapes': ('cityscapes/semantic_segmentation', 19),
              'synthetic_scenes': ('synthetic_scenes',
                                   len(synthetic_scenes.CLASS_NAMES))}
  assert set(sd.DATASET_KEYS) == set(expected)
  for key, (tfds_name, num_classes) in expected.items():
    dataset = sd.get_dataset(key)
    assert (dataset.tfds_name, dataset.num_classes) == (tfds_name, num_classes)
    assert len(dataset.class_names) == num_classes
    assert dataset.ignore_index == 255
    assert dataset.splits == {'train': 'train', 'validation': 'validation'}
  assert sd.get_dataset('ade20k').class_names[0] == 'wall'
  assert sd.get_dataset('pascal_context').class_names[0] == 'background'
  tiny = sd.get_dataset('synthetic_scenes/tiny')
  assert (tiny.key, tiny.tfds_name) == ('synthetic_scenes/tiny',
                                        'synthetic_scenes/tiny')
  with pytest.raises(ValueError, match='unknown segmentation dataset'):
    sd.get_dataset('voc')


def test_segmentation_source_indexing():
  dataset = sd.SegmentationDataset(
      key='fake', tfds_name='fake', splits={}, num_classes=2,
      class_names=('a', 'b'), builder_module=None, label_key='label',
      label_transform=lambda label: label + 1)
  rows = [dict(image=np.full((2, 3, 3), i, np.uint8),
               label=np.full((2, 3, 1), i, np.uint8)) for i in range(3)]
  source = sd.SegmentationSource(rows, dataset)
  assert source[-1]['segmentation'].tolist() == [[3, 3, 3], [3, 3, 3]]
  assert [int(e['image'][0, 0, 0]) for e in source] == [0, 1, 2]
  with pytest.raises(IndexError):
    source[3]  # pylint: disable=pointless-statement


@pytest.mark.parametrize('key,manual_files', [
    ('ade20k', ['ADEChallengeData2016.zip', ade20k.ARCHIVE_SHA1]),
    ('pascal_context', ['pcontext.tar', 'prepare_pcontext.py']),
    ('cityscapes', ['leftImg8bit_trainvaltest.zip',
                    'gtFine_trainvaltest.zip']),
])
def test_unprepared_error_says_where_and_how(tmp_path, key, manual_files):
  data_dir = str(tmp_path)
  with pytest.raises(sources.DatasetNotPreparedError) as error:
    sd.open_segmentation_source(key, 'validation', data_dir)
  message = str(error.value)
  assert 'is not prepared' in message
  assert os.path.join(data_dir, 'downloads', 'manual') in message
  for name in manual_files:
    assert name in message
  assert (f'python -m lvtp_jax.data.prepare {key} --data_dir={data_dir}'
          in message)
  tfds_name = sd.get_dataset(key).tfds_name
  imports = ('' if key == 'cityscapes' else
             f' --imports=lvtp_jax.data.{key}')
  assert (f'tfds build {tfds_name}{imports} --data_dir={data_dir} '
          '--file_format=array_record') in message
  assert not os.listdir(data_dir)


def test_unprepared_synthetic_scenes_says_it_is_generated(tmp_path):
  with pytest.raises(sources.DatasetNotPreparedError) as error:
    sd.open_segmentation_source('synthetic_scenes/tiny', 'train',
                                str(tmp_path))
  message = str(error.value)
  assert 'generated offline' in message
  assert 'manual' not in message
  assert 'python -m lvtp_jax.data.prepare synthetic_scenes/tiny' in message
