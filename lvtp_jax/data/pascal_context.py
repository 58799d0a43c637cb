"""TFDS builder `pascal_context`: PASCAL-Context, 59 classes + background.

PASCAL-Context (Mottaghi et al., CVPR 2014) has no TFDS builder and no
single official archive with 60-class masks: the masks come from
PyTorch-Encoding's `train.pth` / `val.pth`, which Segmenter's
`segm/scripts/prepare_pcontext.py` writes out as PNGs next to the VOC2010
images. This builder reads that result, packed into one archive:

  pcontext/VOCdevkit/VOC2010/JPEGImages/<id>.jpg
  pcontext/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png
  pcontext/VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt
  pcontext/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt

(any folders above VOCdevkit/VOC2010 are fine; other VOC2010 files are
ignored), e.g. after running Segmenter's script on <root>:

  tar -cf <data_dir>/downloads/manual/pcontext.tar -C <root> pcontext

The archive is `pcontext.tar` (uncompressed, so members can be read in any
order) or `pcontext.zip`. The masks are uint8 PNGs with 0 = background and
1..59 = the classes; they are stored unchanged: Segmenter (mmseg
PascalContextDataset without reduce_zero_label) evaluates 60 classes
including background, ignore index 255, the "PC-60" mIoU.

Examples are written in the order of train.txt / val.txt (shuffling
disabled), which Segmenter's script sorts.
"""

import io
import re
import tarfile
import zipfile
from typing import Any, Dict, Iterator, List, Tuple

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from lvtp_jax.data import sources

# Accepted archive names in the manual directory, in order of preference.
ARCHIVE_NAMES = ('pcontext.tar', 'pcontext.zip')
NUM_CLASSES = 60
IGNORE_INDEX = 255

# TFDS split -> list file under ImageSets/SegmentationContext/.
_SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt'}

# Names of ids 0..59 (Segmenter `segm/data/config/pascal_context.yml`).
CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'table', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor', 'bag',
    'bed', 'bench', 'book', 'building', 'cabinet', 'ceiling', 'cloth',
    'computer', 'cup', 'door', 'fence', 'floor', 'flower', 'food', 'grass',
    'ground', 'keyboard', 'light', 'mountain', 'mouse', 'curtain', 'platform',
    'sign', 'plate', 'road', 'rock', 'shelves', 'sidewalk', 'sky', 'snow',
    'bedclothes', 'track', 'tree', 'truck', 'wall', 'water', 'window', 'wood')

_CITATION = """\
@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation
         in the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho,
          Nam-Gyu and Lee, Seong-Whan and Fidler, Sanja and Urtasun, Raquel
          and Yuille, Alan},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and
             Pattern Recognition},
  year={2014}
}
"""

_SPLIT_LIST_PATTERN = re.compile(
    r'(?:^|/)(VOCdevkit/VOC2010/)ImageSets/SegmentationContext/[^/]+\.txt$')


class _Archive:
  """Reads members of an uncompressed tar or a zip file by name."""

  def __init__(self, fileobj: Any, path: str):
    if path.endswith('.zip'):
      zip_file = zipfile.ZipFile(fileobj)
      self._members = {name: name for name in zip_file.namelist()}
      self._read = zip_file.read
    else:
      try:
        # 'r:' refuses compressed tars: seeking back in a gzip stream means
        # decompressing from the start, once per member.
        tar = tarfile.open(fileobj=fileobj, mode='r:')
      except tarfile.ReadError as e:
        raise ValueError(
            f'{path} is not an uncompressed tar file ({e}); decompress it '
            '(e.g. gunzip) or pack the files as pcontext.zip.') from e
      self._members = {m.name: m for m in tar.getmembers() if m.isfile()}
      self._read = lambda name: tar.extractfile(self._members[name]).read()

  def names(self) -> List[str]:
    return list(self._members)

  def read(self, name: str) -> bytes:
    if name not in self._members:
      raise ValueError(
          f'{name} is missing from the archive; it is listed in the split '
          "file, so the archive is incomplete (re-run Segmenter's "
          'prepare_pcontext.py and pack VOCdevkit/VOC2010 again).')
    return self._read(name)


def check_labels(label: np.ndarray, name: str) -> np.ndarray:
  """Checks that a PASCAL-Context mask holds only ids 0..59 and 255.

  Args:
    label: uint8 [H, W].
    name: file name, for the error message.

  Returns:
    `label`, unchanged.
  """
  values = np.unique(label)
  bad = values[(values >= NUM_CLASSES) & (values != IGNORE_INDEX)]
  if bad.size:
    raise ValueError(
        f'{name} holds values {bad.tolist()[:5]} outside 0..{NUM_CLASSES - 1} '
        f'and {IGNORE_INDEX}; expected the 60-class masks that Segmenter\'s '
        'prepare_pcontext.py writes (not the 459-class trainval_merged '
        'labels).')
  return label


class PascalContext(tfds.core.GeneratorBasedBuilder):
  """PASCAL-Context, 60 classes (59 + background), VOC2010 images."""

  name = 'pascal_context'
  # What TFDS would compute itself, but tfds 4.9.10 computes it through the
  # `importlib_resources` backport, which it does not install: without this,
  # preparing any builder outside the tensorflow_datasets package fails with
  # ModuleNotFoundError.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': "From Segmenter's prepare_pcontext.py output (PC-60 masks).",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Run Segmenter's segm/scripts/prepare_pcontext.py
  (https://github.com/rstrudel/segmenter), which downloads
  VOCtrainval_03-May-2010.tar and PyTorch-Encoding's train.pth / val.pth and
  writes VOCdevkit/VOC2010/SegmentationClassContext/*.png and
  ImageSets/SegmentationContext/{train,val}.txt. Pack its pcontext folder
  into one uncompressed tar or a zip, named pcontext.tar or pcontext.zip, in
  the manual directory (<data_dir>/downloads/manual/ by default), e.g.
  tar -cf <data_dir>/downloads/manual/pcontext.tar -C <root> pcontext
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'PASCAL-Context with 60 classes (PC-60): 4,996 train and 5,104 '
            'validation images. segmentation: uint8, 0 = background, '
            '1..59 = classes, 255 = ignore.'),
        features=sources.segmentation_features(),
        supervised_keys=('image', 'segmentation'),
        disable_shuffling=True,
        homepage='https://cs.stanford.edu/~roozbeh/pascal-context/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    candidates = [dl_manager.manual_dir / name for name in ARCHIVE_NAMES]
    existing = [path for path in candidates if path.exists()]
    if not existing:
      raise FileNotFoundError(
          f'none of {[str(p) for p in candidates]} exists. '
          f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
    return {
        split: self._generate_examples(existing[0], list_name)
        for split, list_name in _SPLIT_LISTS.items()
    }

  def _generate_examples(self, path: Any,
                         list_name: str) -> Iterator[Tuple[str, Dict]]:
    with path.open('rb') as f:
      archive = _Archive(f, str(path))
      roots = {}
      for name in archive.names():
        match = _SPLIT_LIST_PATTERN.search(name)
        if match:
          roots[name.rsplit('/', 1)[-1]] = name[:match.end(1)]
      if list_name not in roots:
        raise ValueError(
            f'{path} has no VOCdevkit/VOC2010/ImageSets/SegmentationContext/'
            f'{list_name}; pack the output of Segmenter\'s '
            'prepare_pcontext.py (see the manual download instructions).')
      root = roots[list_name]  # '<prefix>VOCdevkit/VOC2010/'
      image_ids = archive.read(
          f'{root}ImageSets/SegmentationContext/{list_name}').decode().split()
      for image_id in image_ids:
        image_bytes = archive.read(f'{root}JPEGImages/{image_id}.jpg')
        label_name = f'{root}SegmentationClassContext/{image_id}.png'
        with Image.open(io.BytesIO(archive.read(label_name))) as pil:
          # Palette PNGs store the class id as the palette index.
          if pil.mode not in ('L', 'P'):
            raise ValueError(
                f'{label_name} has PIL mode {pil.mode!r}; expected a '
                "single-channel class-id PNG (mode 'L' or 'P').")
          label = check_labels(np.asarray(pil), label_name)
        with Image.open(io.BytesIO(image_bytes)) as pil:
          size = pil.size[::-1]
        if size != label.shape:
          raise ValueError(
              f'{image_id}.jpg is {size[0]}x{size[1]} but its mask is '
              f'{label.shape[0]}x{label.shape[1]} (H x W).')
        yield image_id, {
            'image': image_bytes,
            'segmentation': label[:, :, None],
            'image_id': image_id,
        }
