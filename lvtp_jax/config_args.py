"""The `arg` string of `get_config(arg)`: 'key=value,key2=value2,flag'.

`--config configs/x.py:model=deit_tiny_patch16_224,runlocal` passes the text
after ':' to get_config. Types follow the defaults; a bare word sets a bool to
True; an unknown key is an error that lists the known ones.
"""

from typing import Any, Optional

import ml_collections


def _parse_value(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in ('1', 'true', 'yes', ''):
      return True
    if text.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(f'config arg {key}={text!r}: expected a bool.')
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `arg` against `defaults` (key -> default value, which sets the type)."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config arg {key!r}; known: {sorted(defaults)}.')
    out[key] = _parse_value(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(out)
