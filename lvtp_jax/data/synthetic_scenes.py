"""`synthetic_scenes`: the built-in, offline segmentation dataset (TFDS).

The images come from `scene_generator.generate_example` (see there and
docs/synthetic_scenes.md for the scenes and the difficulty knob). This module
wraps them in a TFDS builder, so that they are read like the real datasets,
with `tfds.data_source` (array_record files, no TensorFlow at read time).
Preparing needs tensorflow and downloads nothing.

Configs (image size 128, i.e. an 8x8 token grid with 16x16 patches):

* 'default': 4000 train / 500 validation / 500 selection images,
  difficulty 1.0.
* 'hard': 6000 train / 500 validation / 500 selection images, difficulty
  2.5 (the segmentation test bed, configs/benchmark_seg.py).
* 'snakes': as 'hard' in size, difficulty 1.5, with grey tubes whose class
  is the colour of a marker at one end (the label of a tube patch is
  often many patches away).
* 'paths': as 'snakes', with the tubes drawn along the 8-px patch grid, so
  that a tube patch reaches its marker only through a chain of tube
  patches.
* 'paths_short': 'paths' with 8-14 tubes of 2-5 cells, the first stage
  of a curriculum (docs/benchmark_seg.md).
* 'paths_dense': 'paths_short' with 20-30 tubes (about a third of the
  cells are tube cells).
* 'tiny': 32 train / 16 validation / 8 selection images, for tests.

The 'selection' split is held out from training and from the reported
numbers: it is where settings (pruning thresholds, LVTP-R's knobs) are
chosen before they are evaluated on 'validation'
(lvtp_jax/evaluation/selection.py). Its images are drawn from their own
generator stream, so 'train' and 'validation' are the same as in 1.0.0.

Typical use:

  from lvtp_jax.data import synthetic_scenes  # registers the builder
  synthetic_scenes.prepare(data_dir)           # no-op once prepared
  source = tfds.data_source('synthetic_scenes/default', split='validation',
                            data_dir=data_dir)
  example = source[0]  # {'image': [128, 128, 3], 'segmentation':
                       #  [128, 128, 1], 'index': int}

Command line:

  python -m lvtp_jax.data.prepare synthetic_scenes[/tiny] --data_dir DATA_DIR
  python -m lvtp_jax.data.synthetic_scenes --preview docs/synthetic_scenes.png
  python -m lvtp_jax.data.synthetic_scenes --stats 200
  python -m lvtp_jax.data.synthetic_scenes --edge-stats 200
"""

import argparse
import dataclasses
from typing import Iterator, Optional, Sequence, Tuple

from etils import epath
import numpy as np
from scipy import stats
import tensorflow_datasets as tfds

from lvtp_jax.data import scene_generator
from lvtp_jax.data.scene_generator import CLASS_NAMES  # pylint: disable=unused-import
from lvtp_jax.data.scene_generator import generate_example
from lvtp_jax.data.scene_generator import hard_patch_fraction
from lvtp_jax.data.scene_generator import IGNORE_INDEX  # pylint: disable=unused-import
from lvtp_jax.data.scene_generator import NUM_CLASSES  # pylint: disable=unused-import
from lvtp_jax.data.scene_generator import PALETTE  # pylint: disable=unused-import


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  """Split sizes and generator settings of one `synthetic_scenes` config."""
  num_train: int = 4000
  num_validation: int = 500
  num_selection: int = 500
  image_size: int = scene_generator.DEFAULT_SIZE
  difficulty: float = scene_generator.DEFAULT_DIFFICULTY
  plain_shapes: bool = False
  snakes: bool = False
  paths: bool = False
  path_layout: str = 'long'   # scene_generator.PATH_LAYOUTS (with paths)


def _testbed_config(name: str, description: str,
                    **kwargs) -> SyntheticScenesConfig:
  """A test-bed config: 6000 train / 500 validation / 500 selection."""
  return SyntheticScenesConfig(
      name=name, num_train=6000, num_validation=500, num_selection=500,
      description=('6000 train / 500 validation / 500 selection, 128x128, '
                   + description), **kwargs)


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with stuff regions and thin / small things."""

  # TFDS 4.9.10 derives code_path with importlib_resources, which it does
  # not install, for builders outside its package; this is the same value.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': ('Adds the held-out selection split; train and validation '
                'are unchanged.'),
  }
  BUILDER_CONFIGS = [
      SyntheticScenesConfig(
          name='default', num_train=4000, num_validation=500,
          num_selection=500,
          description=('4000 train / 500 validation / 500 selection, '
                       '128x128, difficulty 1.')),
      _testbed_config(
          'hard', difficulty=2.5,
          description=('difficulty 2.5: more small and thin things, noise, '
                       'blur and colour overlap (configs/benchmark_seg.py).')),
      _testbed_config(
          'shapes', difficulty=2.5, plain_shapes=True,
          description=("'hard' with large flat-coloured disks, blobs and "
                       'triangles that only their outline tells apart: a '
                       'shape patch needs context from its outline.')),
      _testbed_config(
          'snakes', difficulty=1.5, snakes=True,
          description=('stuff as in the other configs (difficulty 1.5) with '
                       '3-5 grey tubes instead of things; a tube\'s class is '
                       'the colour of the marker at its head, often many '
                       'patches away.')),
      _testbed_config(
          'paths', difficulty=1.5, paths=True,
          description=('stuff as in the other configs (difficulty 1.5) with '
                       '3-6 grey tubes along the 8-px patch grid instead of '
                       'things; a tube\'s class is the colour of the marker '
                       'at its head, up to 17 patches away along the tube.')),
      _testbed_config(
          'paths_short', difficulty=1.5, paths=True, path_layout='short',
          description=("'paths' with 8-14 tubes of 2-5 cells: the first "
                       'stage of a curriculum (every tube patch 1-4 steps '
                       'from its marker; most images show every class).')),
      _testbed_config(
          'paths_dense', difficulty=1.5, paths=True, path_layout='dense',
          description=("'paths_short' with 20-30 tubes of 2-5 cells (as "
                       'many as fit, one free cell apart): about a third of '
                       'the cells are tube cells, twice as many.')),
      SyntheticScenesConfig(
          name='tiny', num_train=32, num_validation=16, num_selection=8,
          description=('32 train / 16 validation / 8 selection, 128x128, '
                       'for tests.')),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=(
            'Procedurally generated outdoor-like scenes for semantic '
            f'segmentation; classes: {", ".join(CLASS_NAMES)}.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3),
                                         dtype=np.uint8),
            # Class ids 0..NUM_CLASSES-1; the generator never emits 255.
            'segmentation': tfds.features.Image(shape=(size, size, 1),
                                                dtype=np.uint8),
            'index': np.int64,
        }),
        supervised_keys=('image', 'segmentation'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        'train': self._generate_examples('train', config.num_train),
        'validation': self._generate_examples(
            'validation', config.num_validation),
        'selection': self._generate_examples(
            'selection', config.num_selection),
    }

  def _generate_examples(self, split: str,
                         count: int) -> Iterator[Tuple[int, dict]]:
    config = self.builder_config
    for index in range(count):
      image, label = generate_example(
          split, index, size=config.image_size, difficulty=config.difficulty,
          plain_shapes=config.plain_shapes, snakes=config.snakes,
          paths=config.paths, path_layout=config.path_layout)
      yield index, {'image': image, 'segmentation': label[..., None],
                    'index': index}


def prepare(data_dir: Optional[str], config: str = 'default') -> None:
  """Builds `synthetic_scenes/<config>` in array_record format if missing.

  Statistics are not computed: they need a TensorFlow pass over the data and
  would triple the preparation time for nothing the project reads.

  Args:
    data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
    config: 'default', 'hard' or 'tiny'.
  """
  builder = SyntheticScenes(config=config, data_dir=data_dir,
                            file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))


def builder_config(name: str) -> SyntheticScenesConfig:
  """The builder config called `name` ('default', 'hard', 'paths', ...)."""
  named = {c.name: c for c in SyntheticScenes.BUILDER_CONFIGS}
  if name not in named:
    raise ValueError(f'unknown synthetic_scenes config {name!r}; '
                     f'expected one of {sorted(named)}.')
  return named[name]


# ----------------------------------------------------------------------------
# Preview picture and statistics.
# ----------------------------------------------------------------------------


def save_preview(path: str, indices: Sequence[int] = tuple(range(8)),
                 split: str = 'validation',
                 difficulty: float = scene_generator.DEFAULT_DIFFICULTY,
                 config: Optional[str] = None) -> None:
  """Writes a PNG of samples (image, label map with the patch grid).

  Args:
    path: output file.
    indices: example indices to show, in pairs of columns, two samples a row.
    split: split to draw the samples from.
    difficulty: generator difficulty (when no config is given).
    config: a builder config's name ('hard', 'snakes', 'paths', ...): its
      generator settings instead of `difficulty` (the grid is 8 px for
      'paths', the test bed's patch, else 16 px).
  """
  kwargs, grid = dict(difficulty=difficulty), 16
  if config is not None:
    cfg = builder_config(config)
    kwargs = dict(difficulty=cfg.difficulty, plain_shapes=cfg.plain_shapes,
                  snakes=cfg.snakes, paths=cfg.paths,
                  path_layout=cfg.path_layout)
    grid = scene_generator.PATH_CELL if cfg.paths else 16
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display: only files are written.
  from matplotlib import patches as mpatches  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = (len(indices) + 1) // 2
  fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows + 0.8),
                           squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for k, index in enumerate(indices):
    image, label = generate_example(split, index, **kwargs)
    ax_image, ax_label = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
    ax_image.imshow(image, interpolation='nearest')
    ax_image.set_title(f'{split} #{index}', fontsize=9)
    ax_label.imshow(PALETTE[label], interpolation='nearest')
    # Patch grid, so that easy and hard tokens can be seen.
    for line in range(grid, label.shape[0], grid):
      ax_label.axhline(line - 0.5, color='black', linewidth=0.4)
      ax_label.axvline(line - 0.5, color='black', linewidth=0.4)
    ax_label.set_title(
        f'hard patches {hard_patch_fraction(label, grid):.0%}', fontsize=9)
  handles = [mpatches.Patch(facecolor=PALETTE[c] / 255, edgecolor='black',
                            label=f'{c} {name}')
             for c, name in enumerate(CLASS_NAMES)]
  fig.legend(handles=handles, loc='lower center', ncol=5, fontsize=9,
             frameon=False)
  fig.tight_layout(rect=(0, 0.8 / (2.6 * rows + 0.8), 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def mean_hard_patch_fraction(
    count: int, split: str = 'validation',
    difficulty: float = scene_generator.DEFAULT_DIFFICULTY) -> float:
  """Mean `hard_patch_fraction` (16 px patches) over the first `count` images."""
  return float(np.mean([
      hard_patch_fraction(generate_example(split, i, difficulty=difficulty)[1])
      for i in range(count)]))


def edge_statistics(count: int, split: str = 'validation',
                    patch: int = 16, *, pool: str = 'mean',
                    color: str = 'luma', scale: int = 1) -> dict:
  """How well LVTP-R's per-patch Sobel edge score finds boundary patches.

  Over the first `count` images of `split`: the score of
  lvtp_jax.pruning.policies.lvtp.lowlevel.edge_scores (luma or colour Sobel
  magnitude at block scale `scale`, `pool` per patch, per-image min-max)
  against whether the patch holds more than one class. Returns dict(auc
  (ROC AUC of the score for multi-class patches), mean_single /
  mean_multi (mean score of single- and multi-class patches), top30_single
  (share of single-class patches among the 30% highest-scoring ones)).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lvtp_jax.pruning.policies.lvtp import lowlevel  # pylint: disable=g-import-not-at-top
  scores, multi = [], []
  for i in range(count):
    image, label = generate_example(split, i)
    e = lowlevel.edge_scores(jnp.asarray(image[None], jnp.float32) / 255,
                             ((0.0,) * 3, (1.0,) * 3), patch, pool=pool,
                             color=color, scale=scale)
    scores.append(np.asarray(e).ravel())
    multi.append(scene_generator.hard_patches(label, patch).ravel())
  score, pos = np.concatenate(scores), np.concatenate(multi)
  ranks = stats.rankdata(score)  # tied scores share their mean rank
  n1, n0 = int(pos.sum()), int((~pos).sum())
  auc = (ranks[pos].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1)
  top = score >= np.quantile(score, 0.7)
  return dict(auc=float(auc), mean_single=float(score[~pos].mean()),
              mean_multi=float(score[pos].mean()),
              top30_single=float((~pos[top]).mean()))


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preview', metavar='PNG',
                      help='write a picture of 8 validation samples')
  parser.add_argument('--stats', type=int, metavar='N',
                      help='print the mean hard-patch fraction of N '
                      'validation images')
  parser.add_argument('--edge-stats', type=int, metavar='N',
                      help='how well the Sobel edge score of LVTP-R finds '
                      'multi-class patches, over N images of --split')
  parser.add_argument('--split', default='validation',
                      help='split of --edge-stats (validation, selection)')
  parser.add_argument('--edge-pool', default='mean',
                      help='--edge-stats: config.pruning.lvtp.edge_pool')
  parser.add_argument('--edge-color', default='luma',
                      help='--edge-stats: config.pruning.lvtp.edge_color')
  parser.add_argument('--edge-scale', type=int, default=1,
                      help='--edge-stats: config.pruning.lvtp.edge_scale')
  parser.add_argument('--difficulty', type=float,
                      default=scene_generator.DEFAULT_DIFFICULTY,
                      help='difficulty for --preview and --stats')
  parser.add_argument('--config', default=None,
                      help="--preview: a config's scenes instead of "
                      "--difficulty ('hard', 'shapes', 'snakes', 'paths')")
  args = parser.parse_args(argv)
  if not (args.preview or args.stats or args.edge_stats):
    parser.error('nothing to do: give --preview, --stats or --edge-stats '
                 '(prepare with python -m lvtp_jax.data.prepare '
                 'synthetic_scenes).')
  if args.preview:
    save_preview(args.preview, difficulty=args.difficulty,
                 config=args.config)
    print(f'wrote {args.preview}')
  if args.stats:
    fraction = mean_hard_patch_fraction(args.stats,
                                        difficulty=args.difficulty)
    print(f'mean hard-patch fraction over {args.stats} validation images '
          f'(difficulty {args.difficulty}): {fraction:.3f}')
  if args.edge_stats:
    out = edge_statistics(args.edge_stats, args.split, pool=args.edge_pool,
                          color=args.edge_color, scale=args.edge_scale)
    print(f'Sobel edge score ({args.edge_color}, scale {args.edge_scale}, '
          f'patch {args.edge_pool}, min-max per image) over '
          f'{args.edge_stats} {args.split} images: ROC AUC for multi-class '
          f'patches {out["auc"]:.3f}; mean score single-class '
          f'{out["mean_single"]:.3f}, multi-class {out["mean_multi"]:.3f}; '
          f'single-class share of the 30% highest scores '
          f'{out["top30_single"]:.3f}')


if __name__ == '__main__':
  main()
