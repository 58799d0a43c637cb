"""Opening prepared TFDS datasets for random access, without TensorFlow.

`open_source` wraps `tfds.data_source` (array_record files) and turns "not
prepared" into a `DatasetNotPreparedError` whose message says where manual
downloads go and which command prepares the dataset. It serves stock TFDS
builders ('imagenet2012', 'cityscapes/semantic_segmentation') and this
project's own ones ('ade20k', 'pascal_context'), whose module must be imported
to register them; `imports=` names that module in the printed commands.

Typical use:

  source = open_source('imagenette/160px-v2', 'validation')
  example = source[0]  # dict of NumPy values, images decoded to uint8
"""

import os
from typing import Any, Dict, Optional, Sequence

import tensorflow_datasets as tfds

# Manual-download notes for stock TFDS builders whose own
# MANUAL_DOWNLOAD_INSTRUCTIONS do not say which files a config needs. `{dir}`
# is replaced by the manual directory. Our own builders carry exact
# instructions, which are printed as they are.
_MANUAL_NOTES = {
    'imagenet2012': (
        'imagenet2012 needs a manual download (register at '
        'https://image-net.org/download-images). Put ILSVRC2012_img_val.tar '
        '(enough for the validation split) and optionally '
        'ILSVRC2012_img_train.tar into {dir}.'),
    'cityscapes': (
        'cityscapes needs a manual download (register at '
        'https://www.cityscapes-dataset.com/login/). Put '
        'leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (enough for '
        'the semantic_segmentation config) into {dir}.'),
}


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset has no array_record files under the data_dir searched."""


def base_name(name: str) -> str:
  """'imagenette/160px-v2:1.0.0' -> 'imagenette'."""
  return name.split('/')[0].split(':')[0]


def prepare_hint(name: str,
                 builder: Any,
                 *,
                 imports: Optional[str] = None,
                 prepare_command: Optional[str] = None,
                 source_note: Optional[str] = None) -> str:
  """How to prepare `name` in array_record format under builder's data_dir.

  Args:
    name: TFDS name, e.g. 'imagenet2012' or 'cityscapes/semantic_segmentation'.
    builder: the dataset's `tfds.core.DatasetBuilder` (gives data_dir and the
      manual-download instructions).
    imports: module that registers the builder (our own builders), added to
      the `tfds build` and Python commands; None for stock TFDS builders.
    prepare_command: an extra, preferred command (e.g. this project's
      `python -m lvtp_jax.data.prepare ...`), printed first; '{data_dir}' in
      it is replaced by the data_dir.
    source_note: replaces the line that says where the source files come
      from (e.g. for a dataset that is generated, not downloaded).

  Returns:
    A multi-line message.
  """
  root = os.fspath(builder.data_dir_root)
  lines = []
  if source_note:
    lines.append(source_note)
  elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual_dir = os.path.join(root, 'downloads', 'manual')
    note = _MANUAL_NOTES.get(base_name(name))
    if note:
      lines.append(note.format(dir=manual_dir))
    else:
      lines.append(
          f'{name} needs a manual download into {manual_dir}: '
          f'{" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
  else:
    lines.append(
        f'{name} downloads its source files automatically while it is '
        'prepared (needs network access once).')
  lines.append(
      'Then prepare it in the array_record format that tfds.data_source '
      'reads (preparing needs tensorflow, e.g. pip install tensorflow-cpu; '
      'reading does not):')
  if prepare_command:
    lines += [f'  {prepare_command.format(data_dir=root)}', 'or']
  imports_flag = f' --imports={imports}' if imports else ''
  import_stmt = f'import {imports}; ' if imports else ''
  lines += [
      f'  tfds build {name}{imports_flag} --data_dir={root} '
      '--file_format=array_record',
      'or',
      f'  python -c "import tensorflow_datasets as tfds; {import_stmt}'
      f"tfds.builder('{name}', data_dir='{root}', "
      "file_format='array_record').download_and_prepare()\"",
      'or pass data_dir= (or set TFDS_DATA_DIR) to where it is already '
      'prepared.',
  ]
  return '\n'.join(lines)


def open_source(name: str,
                split: str,
                data_dir: Optional[str] = None,
                *,
                imports: Optional[str] = None,
                prepare_command: Optional[str] = None,
                source_note: Optional[str] = None
               ) -> Sequence[Dict[str, Any]]:
  """Opens a prepared TFDS split for random access, without TensorFlow.

  Nothing is downloaded: a dataset that is not prepared raises
  `DatasetNotPreparedError` with the commands that prepare it.

  Args:
    name: TFDS name with optional config/version, e.g. 'imagenet2012' or
      'imagenette/160px-v2'. Our own builders must be registered (their
      module imported) before this call.
    split: split name or TFDS slice, e.g. 'validation' or 'validation[:1%]'.
    data_dir: TFDS data_dir; None means TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    imports: see `prepare_hint`.
    prepare_command: see `prepare_hint`.
    source_note: see `prepare_hint`.

  Returns:
    A sequence of examples (dicts of NumPy values); `len()` and indexing
    work, and `.dataset_info` holds the dataset's `tfds.core.DatasetInfo`.
  """
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # tfds reports a missing dataset as an unsupported file format (or other
    # errors depending on the version); check what actually happened.
    builder = tfds.builder(name, data_dir=data_dir)
    hint = prepare_hint(name, builder, imports=imports,
                        prepare_command=prepare_command,
                        source_note=source_note)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f'TFDS dataset {name!r} is not prepared under data_dir '
          f'{os.fspath(builder.data_dir_root)!r} (looked for '
          f'{os.fspath(builder.data_dir)!r}).\n' + hint) from e
    formats = builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      raise DatasetNotPreparedError(
          f'TFDS dataset {name!r} at {os.fspath(builder.data_dir)!r} is '
          f'prepared as {sorted(f.value for f in formats)}, but '
          'tfds.data_source needs array_record files. Convert it with\n'
          f'  tfds convert_format --dataset_version_dir={builder.data_dir} '
          '--out_file_format=array_record\n'
          'or prepare it again into another data_dir:\n' + hint) from e
    raise


def segmentation_features() -> 'tfds.features.FeaturesDict':
  """Features of the real-image segmentation builders (ADE20K, PC).

  The source JPEG bytes are stored as they are (no re-encoding), so decoding
  gives the official pixels; labels are uint8 PNG [H, W, 1].
  """
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format='jpeg'),
      'segmentation': tfds.features.Image(shape=(None, None, 1),
                                          encoding_format='png'),
      'image_id': tfds.features.Text(),
  })
