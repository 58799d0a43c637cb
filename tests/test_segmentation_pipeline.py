"""Tests of the segmentation transforms and the batch pipelines.

Sources are in-memory lists. Most images are blocks of palette colours whose
label is the colour's class, so image/label alignment can be checked after
any geometric augmentation.
"""

import itertools

import numpy as np
import pytest

from lvtp_jax.data import seg_transforms as T
from lvtp_jax.data import segmentation as S

PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
NUM_CLASSES = len(PALETTE)
MEAN, STD = T.SEGMENTER_NORMALIZATION['deit']


def block_example(height, width, rng, block=6):
  """Random blocks of classes; image = PALETTE[label]."""
  grid = rng.integers(0, NUM_CLASSES,
                      (-(-height // block), -(-width // block)))
  label = np.kron(grid, np.ones((block, block), int))[:height, :width]
  label = label.astype(np.uint8)
  return dict(image=PALETTE[label], segmentation=label)


def block_source(num, seed=0, low=20, high=60):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(low, high, (num, 2))
  return [block_example(int(h), int(w), rng) for h, w in sizes]


def denormalize(image):
  return image * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)


def plain_aug(**overrides):
  """train_transform options without photometric distortion."""
  aug = dict(mean=MEAN, std=STD, photometric=False)
  aug.update(overrides)
  return aug


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------
# Per-example transforms.
# ----------------------------------------------------------------------------


def test_train_batches_shapes_dtypes_and_label_values():
  source = block_source(7)
  # An ignore region must survive as 255.
  source[0]['segmentation'][:5] = 255
  batches = take(S.train_batches(source, batch_size=3, crop_size=24, seed=0,
                                 num_threads=0, mean=MEAN, std=STD), 6)
  for batch in batches:
    assert batch['image'].shape == (3, 24, 24, 3)
    assert batch['image'].dtype == np.float32
    assert batch['segmentation'].shape == (3, 24, 24)
    assert batch['segmentation'].dtype == np.int32
    assert set(np.unique(batch['segmentation'])) <= set(range(NUM_CLASSES)) | {
        255}
  # Images are normalised: palette values 0 and 255 land far from 0..255.
  images = np.concatenate([b['image'] for b in batches])
  assert images.min() < -1.5 and images.max() > 1.5


def test_padding_carries_ignore_and_zero():
  rng = np.random.default_rng(1)
  example = block_example(10, 13, rng)
  out = T.train_transform(example, np.random.default_rng(0), crop_size=16,
                          **plain_aug(ratio_range=(1.0, 1.0), flip_prob=0.0))
  np.testing.assert_array_equal(out['segmentation'][:10, :13],
                                example['segmentation'])
  assert (out['segmentation'][10:] == 255).all()
  assert (out['segmentation'][:, 13:] == 255).all()
  # mmseg pads after Normalize, so the padding is 0 in normalised units.
  assert (out['image'][10:] == 0).all() and (out['image'][:, 13:] == 0).all()
  np.testing.assert_allclose(denormalize(out['image'][:10, :13]),
                             example['image'], atol=1e-3)


def test_flip_flips_image_and_label_together():
  rng = np.random.default_rng(2)
  example = block_example(20, 20, rng, block=4)
  aug = plain_aug(ratio_range=(1.0, 1.0), cat_max_ratio=None)
  kept = T.train_transform(example, np.random.default_rng(5), crop_size=20,
                           flip_prob=0.0, **aug)
  flipped = T.train_transform(example, np.random.default_rng(5), crop_size=20,
                              flip_prob=1.0, **aug)
  np.testing.assert_array_equal(kept['segmentation'], example['segmentation'])
  np.testing.assert_array_equal(flipped['segmentation'],
                                example['segmentation'][:, ::-1])
  np.testing.assert_array_equal(flipped['image'], kept['image'][:, ::-1])
  assert not np.array_equal(flipped['segmentation'], kept['segmentation'])


def test_flip_probability_is_about_half():
  image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  label = np.array([[0, 1], [2, 3]], np.uint8)
  flips = 0
  for seed in range(400):
    im, lab = T.random_flip(image, label, np.random.default_rng(seed), 0.5)
    flips += int(lab[0, 0] == 1)
    np.testing.assert_array_equal(im, image[:, ::-1] if lab[0, 0] else image)
  assert 150 < flips < 250


def test_random_rescale_follows_mmseg_size_rule():
  image = np.zeros((100, 300, 3), np.uint8)
  label = np.zeros((100, 300), np.uint8)
  # ADE20K img_scale (2048, 512), ratio 1: factor min(2048/300, 512/100) =
  # 5.12 -> 512 x 1536.
  im, lab = T.random_rescale(image, label, np.random.default_rng(0),
                             ratio_range=(1.0, 1.0), base_scale=(2048, 512))
  assert im.shape == (512, 1536, 3) and lab.shape == (512, 1536)
  # Ratio 0.5: scale (1024, 256), factor 2.56 -> 256 x 768.
  im, _ = T.random_rescale(image, label, np.random.default_rng(0),
                           ratio_range=(0.5, 0.5), base_scale=(2048, 512))
  assert im.shape == (256, 768, 3)
  # No base scale: the image's own size, so the image is scaled by ratio.
  im, _ = T.random_rescale(image, label, np.random.default_rng(0),
                           ratio_range=(2.0, 2.0), base_scale=None)
  assert im.shape == (200, 600, 3)


def test_rescale_and_crop_keep_labels_aligned_with_image():
  source = block_source(6, seed=3)
  pure_fraction = []
  for seed, example in enumerate(source * 3):
    out = T.train_transform(example, np.random.default_rng(seed),
                            crop_size=24, **plain_aug())
    label = out['segmentation']
    assert set(np.unique(label)) <= set(range(NUM_CLASSES)) | {255}
    colour = denormalize(out['image'])
    distance = np.abs(colour[:, :, None, :] - PALETTE.astype(np.float32))
    nearest = distance.max(-1).argmin(-1)
    # Pixels whose colour is (almost) a palette colour, i.e. not a bilinear
    # blend at a block edge, must carry that colour's class.
    pure = (distance.max(-1).min(-1) < 8) & (label != 255)
    np.testing.assert_array_equal(label[pure], nearest[pure])
    pure_fraction.append(pure.sum() / (label != 255).sum())
  assert np.mean(pure_fraction) > 0.6


def test_cat_max_ratio_rejects_crops_dominated_by_one_class():
  label = np.zeros((64, 64), np.uint8)
  label[22:42, 22:42] = 1  # ~10% of the image.
  example = dict(image=PALETTE[label], segmentation=label)

  def dominated(cat_max_ratio):
    count = 0
    for seed in range(60):
      out = T.train_transform(
          example, np.random.default_rng(seed), crop_size=32,
          **plain_aug(ratio_range=(1.0, 1.0), cat_max_ratio=cat_max_ratio))
      share = np.bincount(out['segmentation'].ravel(), minlength=2)[:2]
      count += int(share.max() / share.sum() >= 0.75)
    return count

  assert dominated(0.75) <= 1  # Only if all 10 retries fail.
  assert dominated(None) > 20


def test_photometric_distortion_ranges_and_grey_stays_grey():
  grey = np.full((4, 4, 3), 128, np.uint8)
  outputs = [T.photometric_distortion(grey, np.random.default_rng(seed))
             for seed in range(200)]
  values = np.stack(outputs).astype(int)
  assert values.dtype == int and all(o.dtype == np.uint8 for o in outputs)
  # Brightness +-32 and contrast 0.5..1.5 in either order bound a grey
  # pixel to [(128 - 32) * 0.5, (128 + 32) * 1.5] u [128 * 0.5 - 32, ...].
  assert values.min() >= 32 and values.max() <= 240
  assert values.min() < 90 and values.max() > 170
  # Saturation and hue leave grey grey (up to the uint8 HSV round trip).
  assert (values.max(-1) - values.min(-1)).max() <= 1


def test_photometric_distortion_changes_colour_but_not_labels():
  example = block_source(1, seed=4)[0]
  changed = 0
  for seed in range(10):
    on = T.train_transform(example, np.random.default_rng(seed), crop_size=24,
                           mean=MEAN, std=STD)
    off = T.train_transform(example, np.random.default_rng(seed),
                            crop_size=24, **plain_aug())
    np.testing.assert_array_equal(on['segmentation'], off['segmentation'])
    changed += int(not np.allclose(on['image'], off['image']))
  assert changed >= 5


def test_normalize_rejects_unit_range_stats():
  with pytest.raises(ValueError, match='0..255'):
    T.normalize(np.zeros((2, 2, 3), np.uint8), (0.5,) * 3, (0.5,) * 3)


# ----------------------------------------------------------------------------
# Training stream: determinism, epochs, sharding.
# ----------------------------------------------------------------------------


def index_source(num):
  """Uniform images whose colour encodes the example index."""
  return [dict(image=np.full((12 + i, 16, 3), 10 * i, np.uint8),
               segmentation=np.full((12 + i, 16), i % 3, np.uint8))
          for i in range(num)]


def batch_indices(batch):
  return np.round(denormalize(batch['image'][:, 0, 0])[:, 0] / 10).astype(int)


def test_epochs_are_permutations_that_change():
  aug = plain_aug(ratio_range=(1.0, 1.0), cat_max_ratio=None)
  batches = take(S.train_batches(index_source(8), batch_size=4, crop_size=12,
                                 seed=3, num_threads=0, **aug), 4)
  order = np.concatenate([batch_indices(b) for b in batches])
  assert sorted(order[:8]) == list(range(8))
  assert sorted(order[8:]) == list(range(8))
  assert not np.array_equal(order[:8], order[8:])


def test_augmentation_of_an_example_changes_between_epochs():
  # One example: every step is a new epoch of the same image.
  batches = take(S.train_batches(block_source(1, seed=13), batch_size=1,
                                 crop_size=16, seed=0, num_threads=0,
                                 mean=MEAN, std=STD), 4)
  images = [b['image'] for b in batches]
  assert all(not np.array_equal(a, b)
             for a, b in itertools.combinations(images, 2))


def test_same_seed_same_batches_and_threads_do_not_matter():
  source = block_source(5, seed=5)
  first = take(S.train_batches(source, batch_size=2, crop_size=16, seed=7,
                               num_threads=0, mean=MEAN, std=STD), 4)
  again = take(S.train_batches(source, batch_size=2, crop_size=16, seed=7,
                               num_threads=2, mean=MEAN, std=STD), 4)
  assert_batches_equal(first, again)


def test_resume_equals_uninterrupted_run():
  source = block_source(5, seed=6)
  kwargs = dict(batch_size=2, crop_size=16, seed=1, num_threads=2, mean=MEAN,
                std=STD)
  full = take(S.train_batches(source, **kwargs), 7)
  resumed = take(S.train_batches(source, start_step=4, **kwargs), 3)
  assert_batches_equal(full[4:], resumed)


def test_different_seeds_differ():
  source = block_source(5, seed=7)
  a = take(S.train_batches(source, batch_size=2, crop_size=16, seed=0,
                           num_threads=0, mean=MEAN, std=STD), 3)
  b = take(S.train_batches(source, batch_size=2, crop_size=16, seed=1,
                           num_threads=0, mean=MEAN, std=STD), 3)
  for x, y in zip(a, b):
    assert not np.array_equal(x['image'], y['image'])


def test_process_shards_union_is_the_global_batch():
  source = block_source(5, seed=8)
  kwargs = dict(batch_size=4, crop_size=16, seed=2, start_step=1,
                num_threads=0, mean=MEAN, std=STD)
  full = take(S.train_batches(source, **kwargs), 3)
  shards = [take(S.train_batches(source, process_index=k, process_count=2,
                                 **kwargs), 3) for k in range(2)]
  for step, batch in enumerate(full):
    for key in batch:
      assert shards[0][step][key].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]),
          batch[key])


def test_train_batches_validates_arguments():
  with pytest.raises(ValueError, match='divisible'):
    next(S.train_batches(block_source(2), batch_size=3, crop_size=8, seed=0,
                         process_count=2))
  with pytest.raises(ValueError, match='empty'):
    next(S.train_batches([], batch_size=2, crop_size=8, seed=0))


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('height, width, expected', [
    # factor = min(2048 / long, 512 / short); sizes int(x * factor + 0.5).
    (375, 500, (512, 683)),    # f = 1.36533: 682.67 -> 683.
    (600, 800, (512, 683)),    # f = 0.85333: 682.67 -> 683.
    (100, 1000, (205, 2048)),  # long side caps: f = 2.048, 204.8 -> 205.
    (512, 512, (512, 512)),
    (683, 341, (1026, 512)),   # f = 1.50147: 1025.50 -> 1026.
])
def test_eval_resize_shape_matches_hand_computed_sizes(height, width,
                                                       expected):
  assert T.eval_resize_shape(height, width, short_size=512,
                             long_max=2048) == expected


def test_eval_transform_resizes_image_and_keeps_original_label():
  example = block_example(30, 40, np.random.default_rng(9))
  out = T.eval_transform(example, short_size=48, long_max=192, mean=MEAN,
                         std=STD)
  assert out['image'].shape == (48, 64, 3)
  assert out['image'].dtype == np.float32
  np.testing.assert_array_equal(out['segmentation'], example['segmentation'])


def test_eval_transform_padded_with_resize():
  example = block_example(10, 20, np.random.default_rng(10))
  out = T.eval_transform_padded(example, size=32, short_size=16, mean=MEAN,
                                std=STD)
  # short side 16 -> 16 x 32 (long side exactly at the cap of 32).
  assert out['pixel_mask'][:16].all() and not out['pixel_mask'][16:].any()
  assert (out['segmentation'][16:] == 255).all()
  assert set(np.unique(out['segmentation'][:16])) <= set(range(NUM_CLASSES))
  with pytest.raises(ValueError, match='does not fit'):
    T.eval_transform_padded(example, size=16, mean=MEAN, std=STD)


def test_eval_batches_pad_and_mask():
  source = block_source(5, seed=11, low=8, high=16)
  batches = list(S.eval_batches(source, batch_size=2, size=16, mean=MEAN,
                                std=STD, num_threads=2))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]['mask'], [True, False])
  assert all(b['mask'].all() for b in batches[:2])
  for i, example in enumerate(source):
    batch, row = batches[i // 2], i % 2
    height, width = example['segmentation'].shape
    assert batch['image'].shape == (2, 16, 16, 3)
    assert batch['segmentation'].dtype == np.int32
    np.testing.assert_array_equal(
        batch['segmentation'][row, :height, :width], example['segmentation'])
    np.testing.assert_allclose(
        denormalize(batch['image'][row, :height, :width]), example['image'],
        atol=1e-3)
    valid = np.zeros((16, 16), bool)
    valid[:height, :width] = True
    np.testing.assert_array_equal(batch['pixel_mask'][row], valid)
    assert (batch['segmentation'][row][~valid] == 255).all()
    assert (batch['image'][row][~valid] == 0).all()
  # The padding row is empty: all ignore, no valid pixels.
  assert (batches[-1]['segmentation'][1] == 255).all()
  assert not batches[-1]['pixel_mask'][1].any()
  assert (batches[-1]['image'][1] == 0).all()


def test_eval_batches_num_examples():
  source = block_source(5, seed=12, low=8, high=16)
  batches = list(S.eval_batches(source, batch_size=4, size=16, mean=MEAN,
                                std=STD, num_examples=2))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]['mask'], [True, True, False, False])
