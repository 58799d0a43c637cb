"""Readers for checkpoint files, all returning {name: np.ndarray}.

`.safetensors` needs only the `safetensors` package; `.pth`, `.pt` and `.bin`
(pickled torch state dicts) need torch, imported only when such a file is read.
"""

import os
from typing import Any, Dict

import numpy as np

SAFETENSORS = ('.safetensors',)
TORCH = ('.pth', '.pt', '.bin')


def _to_numpy(tree: Any) -> Any:
  if hasattr(tree, 'detach'):  # torch.Tensor
    t = tree.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return tree


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if os.path.getsize(path) == 0:
    raise ValueError(f'{path} is empty (0 bytes): the download or copy did '
                     'not finish; fetch the file again.')
  try:
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError and friends name neither the file nor a fix.
    raise ValueError(
        f'{path} is not a readable .safetensors file ({e}). It is truncated, '
        'damaged or in another format: fetch it again and compare its size '
        'and checksum with the source; a torch checkpoint must end in .pth, '
        '.pt or .bin.') from None


def read_torch(path: str) -> Dict[str, Any]:
  """Loads a pickled torch checkpoint on the CPU, tensors turned into NumPy."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'reading {path} needs torch (pip install -r requirements-parity.txt), '
        'or convert the checkpoint to .safetensors first.') from None
  import pickle  # pylint: disable=g-import-not-at-top
  # weights_only=False would execute arbitrary pickled code; checkpoints that
  # hold more than tensors and plain containers are rejected by torch here.
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'weights_only' not in str(e).lower().replace(' ', '_'):
      raise ValueError(f'{path} is not a readable torch checkpoint: '
                       f'{str(e).splitlines()[0]}') from None
    raise ValueError(
        f'{path} holds pickled Python objects (for example a whole nn.Module '
        'from torch.save(model)), not a state dict; lvtp_jax reads tensors '
        'only and never runs pickled code. Save the weights with '
        'torch.save(model.state_dict(), PATH) and convert that file.'
    ) from None
  except (RuntimeError, OSError, EOFError) as e:
    raise ValueError(
        f'{path} is not a readable torch checkpoint ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}): it is truncated or '
        'damaged; fetch it again.') from None
  return _to_numpy(obj)


def read_checkpoint(path: str) -> Dict[str, Any]:
  """Reads a state dict (or a training checkpoint dict holding one) from disk."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint file {path} does not exist.')
  ext = os.path.splitext(path)[1].lower()
  if ext in SAFETENSORS:
    return read_safetensors(path)
  if ext in TORCH:
    return read_torch(path)
  raise ValueError(
      f'cannot read {path}: unknown extension {ext!r}; expected one of '
      f'{SAFETENSORS + TORCH}.')
