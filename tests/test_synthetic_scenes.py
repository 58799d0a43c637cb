"""synthetic_scenes: determinism, content, and the prepared TFDS dataset."""

import numpy as np
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from lvtp_jax.data import scene_generator as gen
from lvtp_jax.data import synthetic_scenes


def test_examples_are_deterministic_and_independent():
  a_img, a_lab = gen.generate_example('train', 5)
  for i in range(3):  # generating others first changes nothing
    gen.generate_example('train', i)
  b_img, b_lab = gen.generate_example('train', 5)
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_lab, b_lab)
  c_img, _ = gen.generate_example('train', 6)
  v_img, _ = gen.generate_example('validation', 5)
  assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, v_img)
  assert a_img.dtype == np.uint8 and a_img.shape == (128, 128, 3)
  assert a_lab.dtype == np.uint8 and a_lab.shape == (128, 128)


def test_content_has_all_classes_thin_structures_and_mostly_easy_patches():
  labels = np.stack([gen.generate_example('validation', i)[1]
                     for i in range(50)])
  assert labels.max() < gen.NUM_CLASSES and gen.NUM_CLASSES >= 8
  assert set(np.unique(labels)) == set(range(gen.NUM_CLASSES))
  # Thin structures: some thing regions at most 3 px wide (an opening with
  # a 4x4 square removes them completely).
  thin = 0
  for lab in labels:
    for c in (gen.POLE, gen.WIRE):
      region = lab == c
      if region.any() and not ndimage.binary_opening(
          region, np.ones((4, 4))).any():
        thin += 1
  assert thin >= 10
  # Hard (multi-class) 16x16 patches are a minority, easy ones the majority.
  fraction = np.mean([gen.hard_patch_fraction(lab) for lab in labels])
  assert 0.15 <= fraction <= 0.45, fraction


def test_difficulty_knob_adds_hard_patches():
  easy = np.mean([gen.hard_patch_fraction(
      gen.generate_example('validation', i, difficulty=0.3)[1])
                  for i in range(40)])
  hard = np.mean([gen.hard_patch_fraction(
      gen.generate_example('validation', i, difficulty=2.0)[1])
                  for i in range(40)])
  assert hard > easy


def test_plain_shapes_are_large_and_flat():
  """The 'shapes' config: every image has a large disk, blob or triangle,
  filled flat (only the smooth illumination varies inside), while the
  textured ones vary sharply (stripes, spots, shading)."""
  shapes = (gen.DISK, gen.BLOB, gen.TRIANGLE)
  steps = {}
  for plain in (False, True):
    grads = []
    for i in range(12):
      img, lab = gen.generate_example('validation', i, difficulty=0.0,
                                      plain_shapes=plain)
      inside = np.isin(lab, shapes)
      if plain:
        assert inside.sum() >= 300, i          # radius >= 12 px
      core = ndimage.binary_erosion(inside, np.ones((5, 5)))[:, 1:]
      dx = np.abs(np.diff(img.astype(np.float32), axis=1)).max(axis=-1)
      grads.append(dx[core])
    steps[plain] = float(np.mean(np.concatenate(grads)))
  assert steps[True] < 1.5 < 3.0 < steps[False], steps


def test_snakes_take_the_class_of_their_marker_far_away():
  """The 'snakes' config: each tube is one connected region of one thing
  class, apart from the others; the saturated pixels of its marker have
  the class's hue; and many tube pixels are far from their marker."""
  import colorsys  # pylint: disable=g-import-not-at-top
  far = []
  for i in range(10):
    img, lab = gen.generate_example('validation', i, difficulty=0.0,
                                    snakes=True)
    things = np.isin(lab, gen.THING_CLASSES)
    regions, count = ndimage.label(things)
    assert 3 <= count <= 5, (i, count)
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in
                    img.reshape(-1, 3) / 255.0]).reshape(img.shape)
    for r in range(1, count + 1):
      region = regions == r
      (cls,) = np.unique(lab[region])          # one class per tube
      marker = region & (hsv[..., 1] > 0.6)
      assert marker.sum() >= 40, (i, r)        # radius >= 5 px
      hue = np.median(hsv[..., 0][marker])
      gap = abs((hue - gen.SNAKE_HUES[int(cls)] + 0.5) % 1.0 - 0.5)
      assert gap < 0.05, (i, r, hue, cls)
      cy, cx = np.argwhere(marker).mean(axis=0)
      yy, xx = np.nonzero(region)
      far.append(np.mean(np.hypot(yy - cy, xx - cx) > 32))
  assert np.mean(far) > 0.3, np.mean(far)      # 4+ patches of 8 px away


@pytest.mark.parametrize('layout, tubes, length', [
    ('long', (3, 6), (5, 18)), ('short', (5, 14), (2, 5)),
    ('dense', (14, 30), (2, 5))])
def test_paths_are_chains_of_patches_led_by_their_marker(layout, tubes,
                                                         length):
  """The 'paths' config ('long' layout) and 'paths_short' ('short'): every
  tube covers a simple chain of 8 x 8 cells (each cell has at most two tube
  neighbours, no other tube within one cell, diagonals included), takes
  one thing class, and has its marker in an end cell with the class's hue;
  with 'long', many tube cells are far from the marker along the chain,
  with 'short' none is more than 4 steps away."""
  import colorsys  # pylint: disable=g-import-not-at-top
  cell, steps = gen.PATH_CELL, []
  for i in range(12):
    img, lab = gen.generate_example('validation', i, difficulty=0.0,
                                    paths=True, path_layout=layout)
    regions, count = ndimage.label(np.isin(lab, gen.THING_CLASSES))
    assert tubes[0] <= count <= tubes[1], (i, count)
    n = lab.shape[0] // cell
    owner = np.zeros((n, n), int)
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in
                    img.reshape(-1, 3) / 255.0]).reshape(img.shape)
    for r in range(1, count + 1):
      region = regions == r
      (cls,) = np.unique(lab[region])
      cells = region.reshape(n, cell, n, cell).any(axis=(1, 3))
      assert not (owner[cells] > 0).any(), (i, r)      # cells not shared
      grown = ndimage.binary_dilation(cells, np.ones((3, 3), bool))
      assert not (owner[grown] > 0).any(), (i, r)      # one free cell apart
      owner[cells] = r
      ys, xs = np.nonzero(cells)
      degree = {(y, x): sum(cells[y + a, x + b] for a, b in
                            ((0, 1), (1, 0), (0, -1), (-1, 0))
                            if 0 <= y + a < n and 0 <= x + b < n)
                for y, x in zip(ys, xs)}
      assert length[0] <= len(degree) <= length[1], (i, r, len(degree))
      assert max(degree.values()) <= 2, (i, r)
      ends = [k for k, d in degree.items() if d == 1]
      assert len(ends) == 2, (i, r, ends)              # a simple chain
      marker = region & (hsv[..., 1] > 0.6)
      assert marker.sum() >= 25, (i, r)
      hue = np.median(hsv[..., 0][marker])
      gap = abs((hue - gen.SNAKE_HUES[int(cls)] + 0.5) % 1.0 - 0.5)
      assert gap < 0.05, (i, r, hue, cls)
      head = tuple(int(v) for v in np.argwhere(marker).mean(axis=0) // cell)
      assert head in ends, (i, r, head, ends)
      # Chain distance of every cell from the head (breadth first).
      dist, frontier = {head: 0}, [head]
      while frontier:
        y, x = frontier.pop(0)
        for a, b in ((0, 1), (1, 0), (0, -1), (-1, 0)):
          k = (y + a, x + b)
          if k in degree and k not in dist:
            dist[k] = dist[(y, x)] + 1
            frontier.append(k)
      assert len(dist) == len(degree)                  # connected
      steps.extend(dist.values())
      # path_steps, the generator's own record, agrees with the chain.
      recorded = gen.path_steps('validation', i, difficulty=0.0,
                                path_layout=layout)
      assert {k: int(recorded[k]) for k in dist} == dist, (i, r)
    assert ((recorded >= 0) == (owner > 0)).all(), i
  far = np.mean(np.array(steps) >= 6)
  assert far > 0.2 if layout == 'long' else max(steps) <= 4, far
  with pytest.raises(ValueError, match="path layout 'curly'"):
    gen.generate_example('validation', 0, paths=True, path_layout='curly')


def test_one_scene_set_at_a_time():
  with pytest.raises(ValueError, match='one of them'):
    gen.generate_example('train', 0, snakes=True, paths=True)


def test_prepared_tiny_dataset_equals_the_generator(tmp_path):
  synthetic_scenes.prepare(str(tmp_path), config='tiny')
  source = tfds.data_source('synthetic_scenes/tiny', split='validation',
                            data_dir=str(tmp_path))
  assert len(source) == 16
  for k in range(len(source)):
    ex = source[k]
    image, label = gen.generate_example('validation', int(ex['index']))
    np.testing.assert_array_equal(ex['image'], image)
    np.testing.assert_array_equal(ex['segmentation'][..., 0], label)
  # The held-out selection split: its own images, none of validation's or
  # train's.
  selection = tfds.data_source('synthetic_scenes/tiny', split='selection',
                               data_dir=str(tmp_path))
  assert len(selection) == 8
  seen = {gen.generate_example(split, i)[0].tobytes()
          for split, count in (('train', 32), ('validation', 16))
          for i in range(count)}
  for k in range(len(selection)):
    ex = selection[k]
    image, label = gen.generate_example('selection', int(ex['index']))
    np.testing.assert_array_equal(ex['image'], image)
    np.testing.assert_array_equal(ex['segmentation'][..., 0], label)
    assert image.tobytes() not in seen
  # Preparing again is a no-op that keeps the data.
  synthetic_scenes.prepare(str(tmp_path), config='tiny')
  assert len(tfds.data_source('synthetic_scenes/tiny', split='train',
                              data_dir=str(tmp_path))) == 32


def test_preview_writes_a_png(tmp_path):
  path = tmp_path / 'preview.png'
  synthetic_scenes.save_preview(str(path), indices=(0, 1))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  synthetic_scenes.save_preview(str(path), indices=(0,), config='paths')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='unknown synthetic_scenes config'):
    synthetic_scenes.save_preview(str(path), config='pathz')


def test_edge_statistics_match_a_direct_count():
  out = synthetic_scenes.edge_statistics(3)
  assert 0 <= out['auc'] <= 1 and 0 <= out['top30_single'] <= 1
  # The AUC is the probability that a multi-class patch outscores a
  # single-class one: count the pairs directly (scipy-free reference).
  from lvtp_jax.pruning.policies.lvtp import lowlevel  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  scores, multi = [], []
  for i in range(3):
    image, label = gen.generate_example('validation', i)
    y = lowlevel.luma(jnp.asarray(image[None], jnp.float32) / 255)
    e = np.asarray(lowlevel.minmax(lowlevel.patch_pool(
        lowlevel.sobel_magnitude(y), 16, 'mean'))).ravel()
    scores.append(e)
    multi.append([len(np.unique(label[r:r + 16, c:c + 16])) > 1
                  for r in range(0, 128, 16) for c in range(0, 128, 16)])
  s, m = np.concatenate(scores), np.concatenate(multi)
  pairs = s[m][:, None] - s[~m][None, :]
  want = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
  assert out['auc'] == pytest.approx(want, abs=1e-9)
  assert out['mean_multi'] == pytest.approx(s[m].mean(), rel=1e-6)


def test_edge_statistics_pass_the_split_and_score_options():
  from lvtp_jax.pruning.policies.lvtp import lowlevel  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out = synthetic_scenes.edge_statistics(2, 'selection', pool='max',
                                         color='rgb', scale=4)
  scores, multi = [], []
  for i in range(2):
    image, label = gen.generate_example('selection', i)
    scores.append(np.asarray(lowlevel.edge_scores(
        jnp.asarray(image[None], jnp.float32) / 255, ((0.,) * 3, (1.,) * 3),
        16, pool='max', color='rgb', scale=4)).ravel())
    multi.append(gen.hard_patches(label).ravel())
  s, m = np.concatenate(scores), np.concatenate(multi)
  pairs = s[m][:, None] - s[~m][None, :]
  want = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
  assert out['auc'] == pytest.approx(want, abs=1e-9)
  assert out != synthetic_scenes.edge_statistics(2, 'selection')
