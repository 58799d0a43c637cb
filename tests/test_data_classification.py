"""Tests for lvtp_jax.data.classification.

The transform is checked against timm's own eval transform; the TFDS layer
against `tfds.testing.mock_data` and against a tiny dataset prepared on disk
in array_record format (read in a subprocess to show no TensorFlow is needed).
"""

import functools
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from lvtp_jax.data import classification as cls

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (height, width): odd sizes, a square one that needs no resize at 224 / 1.0,
# and extreme aspect ratios. 180x600 puts the crop offset at 150.5, which
# torchvision's round-half-to-even takes to 150.
IMAGE_SIZES = ((300, 500), (257, 231), (224, 224), (600, 180), (180, 600),
               (97, 131))


def _random_image(height, width, seed):
  # Smooth gradients plus noise: resampling errors show up on both.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = (xx * 255 // max(width - 1, 1) + yy * 127 // max(height - 1, 1))
  noise = rng.integers(0, 96, (height, width, 3))
  return ((base[..., None] + noise) % 256).astype(np.uint8)


def _timm_model_config(model_name):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # Only the model's pretrained_cfg is read; the meta device skips the
  # (seconds-long) weight initialisation.
  with torch.device('meta'):
    model = timm.create_model(model_name, pretrained=False)
  return timm.data.resolve_data_config({}, model=model)


@functools.lru_cache(maxsize=None)
def _timm_configs():
  """name -> timm data config (input_size, interpolation, mean, std, ...)."""
  configs = {
      # crop_pct 0.9: the short side goes to floor(224 / 0.9) = 248.
      'deit_small_patch16_224': _timm_model_config('deit_small_patch16_224'),
      # crop_pct 1.0, mean = std = 0.5.
      'vit_tiny_patch16_384': _timm_model_config('vit_tiny_patch16_384'),
  }
  # Configs no model above has: bilinear, and crop_pct > 1 (zero padding).
  configs['bilinear_0.875'] = dict(
      configs['deit_small_patch16_224'], interpolation='bilinear',
      crop_pct=0.875)
  configs['bicubic_1.15'] = dict(
      configs['deit_small_patch16_224'], crop_pct=1.15)
  return configs


def _ours(config, image):
  return cls.eval_transform(
      image, img_size=config['input_size'][-1], crop_pct=config['crop_pct'],
      mean=config['mean'], std=config['std'],
      interpolation=config['interpolation'])


def _timm(config, pil_image):
  import timm  # pylint: disable=g-import-not-at-top
  transform = timm.data.create_transform(**config)
  return transform(pil_image).permute(1, 2, 0).numpy()


@pytest.mark.parametrize('config_name', [
    'deit_small_patch16_224', 'vit_tiny_patch16_384', 'bilinear_0.875',
    'bicubic_1.15'
])
def test_eval_transform_matches_timm(config_name):
  config = _timm_configs()[config_name]
  size = config['input_size'][-1]
  for i, (height, width) in enumerate(IMAGE_SIZES):
    image = _random_image(height, width, seed=i)
    ours = _ours(config, image)
    theirs = _timm(config, Image.fromarray(image))
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(
        ours, theirs, rtol=0, atol=1e-5,
        err_msg=f'{config_name} on a {height}x{width} image')


def test_resize_shape_matches_torchvision():
  # pylint: disable-next=g-import-not-at-top
  from torchvision.transforms import functional as tvf
  # The private helper is what torchvision's Resize calls for an int size.
  # pylint: disable-next=protected-access
  torchvision_shape = tvf._compute_resized_output_size
  rng = np.random.default_rng(0)
  for height, width in rng.integers(16, 2000, (500, 2)).tolist():
    for size in (248, 256, 384, 438):
      ours = cls.shorter_side_resize_shape(height, width, size)
      assert list(ours) == torchvision_shape((height, width), [size])


def test_resize_scale_size_floors_like_timm():
  assert cls.resize_scale_size(224, 0.9) == 248
  assert cls.resize_scale_size(224, 0.875) == 256
  assert cls.resize_scale_size(384, 1.0) == 384
  with pytest.raises(ValueError, match='crop_pct must be > 0'):
    cls.resize_scale_size(224, 0.0)


def test_grayscale_is_tiled_like_pil_convert_rgb():
  config = _timm_configs()['deit_small_patch16_224']
  gray = _random_image(150, 210, seed=7)[..., :1]
  expected = _timm(config, Image.fromarray(gray[..., 0]).convert('RGB'))
  for image in (gray, gray[..., 0]):
    np.testing.assert_allclose(_ours(config, image), expected, rtol=0,
                               atol=1e-5)


def test_bad_images_are_rejected():
  config = _timm_configs()['deit_small_patch16_224']
  with pytest.raises(ValueError, match='uint8'):
    _ours(config, np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match='RGBA'):
    _ours(config, np.zeros((32, 32, 4), np.uint8))
  with pytest.raises(ValueError, match='unknown interpolation'):
    cls.eval_transform(np.zeros((32, 32, 3), np.uint8), img_size=16,
                       crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                       interpolation='cubic')


def test_normalize_matches_per_image_and_checks_inputs():
  images = np.stack([_random_image(8, 8, seed=s) for s in range(3)])
  out = cls.normalize(images, cls.IMAGENET_DEFAULT_MEAN,
                      cls.IMAGENET_DEFAULT_STD)
  assert out.shape == (3, 8, 8, 3) and out.dtype == np.float32
  expected = ((images / 255.0 - np.array(cls.IMAGENET_DEFAULT_MEAN)) /
              np.array(cls.IMAGENET_DEFAULT_STD))
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='uint8'):
    cls.normalize(images / 255.0, (0.5,) * 3, (0.5,) * 3)
  with pytest.raises(ValueError, match='one value per channel'):
    cls.normalize(images, (0.5,), (0.5,))


# ----------------------------------------------------------------------------
# Label maps.
# ----------------------------------------------------------------------------


def test_imagenette_map_matches_timm_and_tfds_synset_order():
  import timm  # pylint: disable=g-import-not-at-top
  timm_wnids = timm.data.ImageNetInfo().label_names()
  tfds_wnids = tfds.builder('imagenet2012').info.features['label'].names
  assert list(timm_wnids) == list(tfds_wnids) == sorted(tfds_wnids)
  expected = [timm_wnids.index(w) for w in cls.IMAGENETTE_WNIDS]
  assert list(cls.IMAGENETTE_TO_IMAGENET1K) == expected
  tfds_imagenette = tfds.builder('imagenette/160px-v2').info.features['label']
  assert list(tfds_imagenette.names) == list(cls.IMAGENETTE_WNIDS)


def test_label_map_for_head():
  label_map = cls.label_map_for_head(
      'imagenette/320px-v2', cls.IMAGENETTE_WNIDS, num_classes=1000)
  assert label_map.dtype == np.int32
  assert label_map.tolist() == [0, 217, 482, 491, 497, 566, 569, 571, 574,
                                701]
  assert cls.label_map_for_head(
      'imagenette', cls.IMAGENETTE_WNIDS, num_classes=10) is None
  imagenet = tfds.builder('imagenet2012').info.features['label'].names
  assert cls.label_map_for_head(
      'imagenet2012:5.1.0', imagenet, num_classes=1000) is None

  shuffled = list(cls.IMAGENETTE_WNIDS[::-1])
  with pytest.raises(ValueError, match='expected the imagenette wnids'):
    cls.label_map_for_head('imagenette/160px-v2', shuffled, num_classes=1000)
  with pytest.raises(ValueError, match='sorted wnids starting with'):
    cls.label_map_for_head('imagenet2012', imagenet[1:] + imagenet[:1],
                           num_classes=1000)
  with pytest.raises(ValueError, match='no label map is known'):
    cls.label_map_for_head('imagenette', cls.IMAGENETTE_WNIDS,
                           num_classes=100)


# ----------------------------------------------------------------------------
# TFDS under mock_data.
# ----------------------------------------------------------------------------


def _small_transform(image):
  return cls.eval_transform(image, img_size=16, crop_pct=0.875,
                            mean=cls.IMAGENET_DEFAULT_MEAN,
                            std=cls.IMAGENET_DEFAULT_STD)


def _check_batches(batches, source, *, batch_size, total, label_map):
  assert len(batches) == -(-total // batch_size)
  for b, batch in enumerate(batches):
    assert batch['image'].shape == (batch_size, 16, 16, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (batch_size,)
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.bool_
    for row in range(batch_size):
      index = b * batch_size + row
      assert batch['mask'][row] == (index < total)
      if index < total:
        example = source[index]
        label = int(example['label'])
        if label_map is not None:
          label = int(label_map[label])
        assert batch['label'][row] == label
        np.testing.assert_array_equal(batch['image'][row],
                                      _small_transform(example['image']))
      else:
        assert batch['label'][row] == 0
        assert not batch['image'][row].any()


@pytest.mark.parametrize('name,num_classes', [
    ('imagenette/160px-v2', 1000),
    ('imagenette/160px-v2', 10),
    ('imagenet2012', 1000),
])
def test_eval_batches_under_mock_data(name, num_classes):
  with tfds.testing.mock_data(num_examples=7,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    source = cls.open_source(name, 'validation')
    assert len(source) == 7
    label_map = cls.label_map_for_head(name, cls.label_names(source),
                                       num_classes=num_classes)
    assert (label_map is not None) == (name.startswith('imagenette') and
                                       num_classes == 1000)
    batches = list(cls.eval_batches(source, batch_size=3,
                                    transform_fn=_small_transform,
                                    label_map=label_map))
    _check_batches(batches, source, batch_size=3, total=7,
                   label_map=label_map)
    if label_map is not None:
      valid = np.concatenate([b['label'][b['mask']] for b in batches])
      assert set(valid.tolist()) <= set(cls.IMAGENETTE_TO_IMAGENET1K)

    limited = list(cls.eval_batches(source, batch_size=4,
                                    transform_fn=_small_transform,
                                    label_map=label_map, num_examples=5,
                                    num_threads=2))
    _check_batches(limited, source, batch_size=4, total=5,
                   label_map=label_map)

    exact = list(cls.eval_batches(source, batch_size=7,
                                  transform_fn=_small_transform,
                                  num_examples=100))
    assert len(exact) == 1 and exact[0]['mask'].all()


def test_eval_batches_argument_errors():
  source = [dict(image=np.zeros((4, 4, 3), np.uint8), label=3)]
  with pytest.raises(ValueError, match='batch_size must be positive'):
    next(cls.eval_batches(source, batch_size=0,
                          transform_fn=_small_transform))
  with pytest.raises(ValueError, match='outside the label_map'):
    next(cls.eval_batches(source, batch_size=2, transform_fn=_small_transform,
                          label_map=np.arange(3)))
  assert not list(cls.eval_batches(source, batch_size=2,
                                   transform_fn=_small_transform,
                                   num_examples=0))


def test_decode_image_accepts_encoded_bytes():
  image = _random_image(9, 13, seed=3)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format='PNG')
  decoded = cls.decode_image(buffer.getvalue())
  np.testing.assert_array_equal(decoded, np.repeat(image[..., :1], 3, -1))


# ----------------------------------------------------------------------------
# Unprepared and prepared datasets on disk.
# ----------------------------------------------------------------------------


def test_unprepared_dataset_error_says_how_to_prepare(tmp_path):
  data_dir = str(tmp_path)
  with pytest.raises(cls.DatasetNotPreparedError) as error:
    cls.open_source('imagenette/160px-v2', 'validation', data_dir=data_dir)
  message = str(error.value)
  assert "'imagenette/160px-v2' is not prepared" in message
  assert data_dir in message
  assert 'downloads its source files automatically' in message
  assert (f'tfds build imagenette/160px-v2 --data_dir={data_dir} '
          '--file_format=array_record') in message
  assert "file_format='array_record').download_and_prepare()" in message

  with pytest.raises(cls.DatasetNotPreparedError) as error:
    cls.open_source('imagenet2012', 'validation', data_dir=data_dir)
  message = str(error.value)
  assert 'ILSVRC2012_img_val.tar' in message
  assert os.path.join(data_dir, 'downloads', 'manual') in message
  assert 'tfds build imagenet2012' in message
  # Nothing was downloaded or created while checking.
  assert not os.listdir(data_dir)


_BUILD_SCRIPT = """
import sys
import numpy as np
import tensorflow_datasets as tfds

class TinyWnids(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(
                names=['n01440764', 'n02102040', 'n02979186']),
            'index': tfds.features.Scalar(np.int64),
        }))

  def _split_generators(self, dl_manager):
    return {'validation': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(5):
      image = rng.integers(0, 256, (20 + 3 * i, 30 - 2 * i, 3), np.uint8)
      yield i, {'image': image, 'label': i % 3, 'index': i}

for data_dir, file_format in zip(sys.argv[1::2], sys.argv[2::2]):
  TinyWnids(data_dir=data_dir, file_format=file_format).download_and_prepare()
"""

_READ_SCRIPT = """
import json, sys
import numpy as np
from lvtp_jax.data import classification as cls

source = cls.open_source('tiny_wnids', 'validation', data_dir=sys.argv[1])
rng = np.random.default_rng(0)
originals = [rng.integers(0, 256, (20 + 3 * i, 30 - 2 * i, 3), np.uint8)
             for i in range(5)]
transform = lambda im: cls.eval_transform(
    im, img_size=16, crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
batches = list(cls.eval_batches(source, batch_size=2, transform_fn=transform))
# TFDS shuffles examples when it writes them; 'index' names the original.
order = [int(source[i]['index']) for i in range(len(source))]
images = np.concatenate([b['image'] for b in batches])[:5]
expected = np.stack([transform(originals[k]) for k in order])
print(json.dumps(dict(
    n=len(source),
    image_type=type(source[0]['image']).__name__,
    image_dtype=str(source[0]['image'].dtype),
    decoded_exactly=all(
        np.array_equal(source[i]['image'], originals[k])
        for i, k in enumerate(order)),
    labels=np.concatenate([b['label'] for b in batches]).tolist(),
    expected_labels=[k % 3 for k in order] + [0],
    mask=np.concatenate([b['mask'] for b in batches]).tolist(),
    max_diff=float(np.abs(images - expected).max()),
    tensorflow_imported='tensorflow' in sys.modules,
)))
"""


def _run(command, env=None):
  result = subprocess.run(command, capture_output=True, text=True, env=env,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_prepared_dataset_is_read_without_tensorflow(tmp_path):
  array_record_dir = str(tmp_path / 'array_record')
  tfrecord_dir = str(tmp_path / 'tfrecord')
  script = tmp_path / 'build_tiny.py'
  script.write_text(textwrap.dedent(_BUILD_SCRIPT))
  # Preparing imports tensorflow; a subprocess keeps it out of this one.
  _run([sys.executable, str(script), array_record_dir, 'array_record',
        tfrecord_dir, 'tfrecord'])
  stdout = _run([sys.executable, '-c', _READ_SCRIPT, array_record_dir],
                env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary.pop('labels') == summary.pop('expected_labels')
  assert summary == dict(
      n=5, image_type='ndarray', image_dtype='uint8', decoded_exactly=True,
      mask=[True] * 5 + [False], max_diff=0.0, tensorflow_imported=False)

  with pytest.raises(cls.DatasetNotPreparedError) as error:
    cls.open_source('tiny_wnids', 'validation', data_dir=tfrecord_dir)
  message = str(error.value)
  assert "prepared as ['tfrecord']" in message
  assert 'tfds convert_format' in message
  assert '--out_file_format=array_record' in message
