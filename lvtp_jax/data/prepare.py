"""Prepares segmentation datasets in the array_record format (needs TF).

  python -m lvtp_jax.data.prepare ade20k pascal_context --data_dir=DATA_DIR
  python -m lvtp_jax.data.prepare cityscapes --data_dir=DATA_DIR \\
      --manual_dir=/archives/cityscapes

Manual downloads are read from --manual_dir, by default
DATA_DIR/downloads/manual (see each builder's MANUAL_DOWNLOAD_INSTRUCTIONS).
Datasets already prepared are left as they are. Feature statistics are not
computed: they need an extra TensorFlow pass over the data and nothing in
this project reads them.
"""

import argparse
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from lvtp_jax.data import segmentation_datasets


def prepare(key: str,
            data_dir: Optional[str] = None,
            manual_dir: Optional[str] = None) -> str:
  """Builds one dataset in array_record format if it is not built yet.

  Args:
    key: registry key of `segmentation_datasets`, e.g. 'ade20k' or
      'synthetic_scenes/tiny'.
    data_dir: TFDS data_dir; None means TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    manual_dir: where manual downloads are; None means
      <data_dir>/downloads/manual.

  Returns:
    The directory of the prepared dataset version.
  """
  dataset = segmentation_datasets.get_dataset(key)
  segmentation_datasets.register_builder(dataset)
  builder = tfds.builder(dataset.tfds_name, data_dir=data_dir,
                         file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return str(builder.data_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
      'keys', nargs='+', metavar='KEY',
      help=('datasets to prepare: '
            f'{", ".join(segmentation_datasets.DATASET_KEYS)} (optionally '
            "with '/<config>', e.g. synthetic_scenes/tiny)."))
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data_dir (default: TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).')
  parser.add_argument('--manual_dir', default=None,
                      help='directory holding the manual downloads '
                      '(default: DATA_DIR/downloads/manual).')
  args = parser.parse_args(argv)
  for key in args.keys:
    # Unknown keys fail before any (slow) preparation starts.
    segmentation_datasets.get_dataset(key)
  for key in args.keys:
    print(f'{key}: {prepare(key, args.data_dir, args.manual_dir)}', flush=True)


if __name__ == '__main__':
  main()
