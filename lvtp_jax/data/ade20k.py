"""TFDS builder `ade20k`: the 150-class ADE20K scene-parsing benchmark.

Built from the official ADEChallengeData2016.zip (MIT Scene Parsing
Benchmark, http://sceneparsing.csail.mit.edu), a manual download: put the zip
into <data_dir>/downloads/manual/ and run

  python -m lvtp_jax.data.prepare ade20k --data_dir=<data_dir>

TFDS' own `scene_parse150` is not this dataset: it stores the Places Challenge
2017 *instance* masks, which cannot reproduce Segmenter / mmseg ADE20K mIoU.

Labels are stored in training ids. The archive's annotations are uint8 PNGs
with 0 = "other / unlabelled" and 1..150 = the classes of objectInfo150.txt;
Segmenter and mmseg (`reduce_zero_label=True` in mmseg's ADE20KDataset, which
Segmenter's `segm/data/ade20k.py` config uses) map 0 -> 255 (ignored) and
k -> k - 1, so class ids are 0..149 (0 = wall) and 255 is ignored. Storing
them that way means every reader sees the evaluation convention.

Examples are written in file-name order (shuffling disabled), so index i of
the validation split is ADE_val_{i+1:08d}, the order mmseg evaluates in.
"""

import io
import re
import zipfile
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from lvtp_jax.data import sources

ARCHIVE_NAME = 'ADEChallengeData2016.zip'
ARCHIVE_URL = (
    'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip')
# sha1 of the official zip, as checked by Segmenter's
# segm/scripts/prepare_ade20k.py.
ARCHIVE_SHA1 = '219e1696abb36c8ba3a3afe7fb2f4b4606a897c7'
NUM_CLASSES = 150
IGNORE_INDEX = 255

# TFDS split -> folder under images/ and annotations/ in the archive.
_SPLIT_FOLDERS = {'train': 'training', 'validation': 'validation'}

# Names of training ids 0..149 (Segmenter `segm/data/config/ade20k.yml`,
# i.e. objectInfo150.txt shifted by the zero-label reduction).
CLASS_NAMES = (
    'wall', 'building, edifice', 'sky', 'floor, flooring', 'tree', 'ceiling',
    'road, route', 'bed', 'windowpane, window', 'grass', 'cabinet',
    'sidewalk, pavement',
    'person, individual, someone, somebody, mortal, soul', 'earth, ground',
    'door, double door', 'table', 'mountain, mount',
    'plant, flora, plant life', 'curtain, drape, drapery, mantle, pall',
    'chair', 'car, auto, automobile, machine, motorcar', 'water',
    'painting, picture', 'sofa, couch, lounge', 'shelf', 'house', 'sea',
    'mirror', 'rug, carpet, carpeting', 'field', 'armchair', 'seat',
    'fence, fencing', 'desk', 'rock, stone', 'wardrobe, closet, press',
    'lamp', 'bathtub, bathing tub, bath, tub', 'railing, rail', 'cushion',
    'base, pedestal, stand', 'box', 'column, pillar', 'signboard, sign',
    'chest of drawers, chest, bureau, dresser', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace, hearth, open fireplace',
    'refrigerator, icebox', 'grandstand, covered stand', 'path',
    'stairs, steps', 'runway', 'case, display case, showcase, vitrine',
    'pool table, billiard table, snooker table', 'pillow',
    'screen door, screen', 'stairway, staircase', 'river', 'bridge, span',
    'bookcase', 'blind, screen', 'coffee table, cocktail table',
    'toilet, can, commode, crapper, pot, potty, stool, throne', 'flower',
    'book', 'hill', 'bench', 'countertop',
    'stove, kitchen stove, range, kitchen range, cooking stove',
    'palm, palm tree', 'kitchen island',
    'computer, computing machine, computing device, data processor, '
    'electronic computer, information processing system',
    'swivel chair', 'boat', 'bar', 'arcade machine',
    'hovel, hut, hutch, shack, shanty',
    'bus, autobus, coach, charabanc, double-decker, jitney, motorbus, '
    'motorcoach, omnibus, passenger vehicle',
    'towel', 'light, light source', 'truck, motortruck', 'tower',
    'chandelier, pendant, pendent', 'awning, sunshade, sunblind',
    'streetlight, street lamp', 'booth, cubicle, stall, kiosk',
    'television, television receiver, television set, tv, tv set, idiot '
    'box, boob tube, telly, goggle box',
    'airplane, aeroplane, plane', 'dirt track',
    'apparel, wearing apparel, dress, clothes', 'pole', 'land, ground, soil',
    'bannister, banister, balustrade, balusters, handrail',
    'escalator, moving staircase, moving stairway',
    'ottoman, pouf, pouffe, puff, hassock', 'bottle',
    'buffet, counter, sideboard',
    'poster, posting, placard, notice, bill, card', 'stage', 'van', 'ship',
    'fountain',
    'conveyer belt, conveyor belt, conveyer, conveyor, transporter',
    'canopy', 'washer, automatic washer, washing machine', 'plaything, toy',
    'swimming pool, swimming bath, natatorium', 'stool', 'barrel, cask',
    'basket, handbasket', 'waterfall, falls', 'tent, collapsible shelter',
    'bag', 'minibike, motorbike', 'cradle', 'oven', 'ball',
    'food, solid food', 'step, stair', 'tank, storage tank',
    'trade name, brand name, brand, marque', 'microwave, microwave oven',
    'pot, flowerpot', 'animal, animate being, beast, brute, creature, fauna',
    'bicycle, bike, wheel, cycle', 'lake',
    'dishwasher, dish washer, dishwashing machine',
    'screen, silver screen, projection screen', 'blanket, cover',
    'sculpture', 'hood, exhaust hood', 'sconce', 'vase',
    'traffic light, traffic signal, stoplight', 'tray',
    'ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, '
    'dustbin, trash barrel, trash bin',
    'fan', 'pier, wharf, wharfage, dock', 'crt screen', 'plate',
    'monitor, monitoring device', 'bulletin board, notice board', 'shower',
    'radiator', 'glass, drinking glass', 'clock', 'flag')

_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and
          Barriuso, Adela and Torralba, Antonio},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and
             Pattern Recognition},
  year={2017}
}
"""


def _reduce_zero_label_table() -> np.ndarray:
  """uint8 [256]: 0 -> 255, k -> k - 1 for k in 1..150, others -> 255."""
  table = np.full((256,), IGNORE_INDEX, np.uint8)
  table[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
  table.setflags(write=False)
  return table


_REDUCE_ZERO_LABEL_TABLE = _reduce_zero_label_table()


def reduce_zero_label(annotation: np.ndarray) -> np.ndarray:
  """Official ADE20K annotation values -> training ids (mmseg convention).

  Args:
    annotation: uint8 [H, W] (or any shape) with 0 = other, 1..150 = classes.

  Returns:
    uint8, same shape: 0 -> 255 (ignore), k -> k - 1 (0..149).
  """
  annotation = np.asarray(annotation)
  if annotation.dtype != np.uint8:
    raise ValueError(
        f'ADE20K annotations are uint8 PNGs, got dtype {annotation.dtype}.')
  if annotation.size and annotation.max() > NUM_CLASSES:
    raise ValueError(
        f'ADE20K annotation value {annotation.max()} is not in 0..'
        f'{NUM_CLASSES}; this is not an ADEChallengeData2016 annotation '
        '(TFDS scene_parse150 instance masks, for example, are RGB).')
  return _REDUCE_ZERO_LABEL_TABLE[annotation]


def _split_members(names: Sequence[str],
                   folder: str) -> List[Tuple[str, str, str]]:
  """(stem, image member, annotation member) of one split, sorted by stem.

  Member names are matched below any top folder, so a re-zipped archive
  without the 'ADEChallengeData2016/' prefix works too. Names starting with
  '.' (macOS resource forks) are skipped.
  """
  patterns = {
      kind: re.compile(rf'(?:^|/){kind}/{folder}/([^/.][^/]*)\.{ext}$')
      for kind, ext in (('images', 'jpg'), ('annotations', 'png'))
  }
  found: Dict[str, Dict[str, str]] = {'images': {}, 'annotations': {}}
  for name in names:
    for kind, pattern in patterns.items():
      match = pattern.search(name)
      if match:
        found[kind][match.group(1)] = name
  images, annotations = found['images'], found['annotations']
  if not images:
    raise ValueError(
        f'no images/{folder}/*.jpg in the archive; expected the official '
        f'{ARCHIVE_NAME} ({ARCHIVE_URL}).')
  unpaired = sorted(set(images) ^ set(annotations))
  if unpaired:
    raise ValueError(
        f'{len(unpaired)} files of images/{folder} and annotations/{folder} '
        f'have no partner (e.g. {unpaired[:3]}); the archive is incomplete, '
        f'download {ARCHIVE_NAME} again.')
  return [(stem, images[stem], annotations[stem]) for stem in sorted(images)]


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K (SceneParsing, 150 classes) from ADEChallengeData2016.zip."""

  name = 'ade20k'
  # What TFDS would compute itself, but tfds 4.9.10 computes it through the
  # `importlib_resources` backport, which it does not install: without this,
  # preparing any builder outside the tensorflow_datasets package fails with
  # ModuleNotFoundError.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'ADEChallengeData2016, labels in training ids (0..149, 255).',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Download {ARCHIVE_NAME} ({ARCHIVE_URL}, sha1 {ARCHIVE_SHA1}) and put the
  zip file, unextracted, into the manual directory
  (<data_dir>/downloads/manual/{ARCHIVE_NAME} by default).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'ADE20K scene parsing (ADEChallengeData2016): 20,210 train and '
            '2,000 validation images. segmentation: uint8 training ids, '
            '0..149 = the 150 classes, 255 = ignore (the official 0, '
            '"other"); original values are shifted down by one.'),
        features=sources.segmentation_features(),
        supervised_keys=('image', 'segmentation'),
        disable_shuffling=True,
        homepage='http://sceneparsing.csail.mit.edu',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = dl_manager.manual_dir / ARCHIVE_NAME
    if not archive.exists():
      raise FileNotFoundError(
          f'{archive} does not exist. '
          f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
    return {
        split: self._generate_examples(archive, folder)
        for split, folder in _SPLIT_FOLDERS.items()
    }

  def _generate_examples(self, archive: Any,
                         folder: str) -> Iterator[Tuple[str, Dict]]:
    # Zip members are read by name, so nothing is extracted to disk.
    with archive.open('rb') as f, zipfile.ZipFile(f) as zf:
      for stem, image_name, annotation_name in _split_members(
          zf.namelist(), folder):
        image_bytes = zf.read(image_name)
        with Image.open(io.BytesIO(zf.read(annotation_name))) as pil:
          if pil.mode != 'L':
            raise ValueError(
                f'{annotation_name} has PIL mode {pil.mode!r}; ADE20K '
                "annotations are single-channel ('L') class-index PNGs.")
          annotation = np.asarray(pil)
        with Image.open(io.BytesIO(image_bytes)) as pil:
          size = pil.size[::-1]
        if size != annotation.shape:
          raise ValueError(
              f'{image_name} is {size[0]}x{size[1]} but {annotation_name} is '
              f'{annotation.shape[0]}x{annotation.shape[1]} (H x W).')
        yield stem, {
            'image': image_bytes,
            'segmentation': reduce_zero_label(annotation)[:, :, None],
            'image_id': stem,
        }
