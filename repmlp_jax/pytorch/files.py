"""Reading a PyTorch checkpoint file into a flat `{name: numpy array}` state_dict, safely.

Files are read with `torch.load(..., weights_only=True)` only: torch's restricted unpickler builds
tensors, containers and nothing else. Training checkpoints of the authors also pickle a yacs
`CfgNode` (the run's config), which that unpickler refuses. Instead of falling back to unrestricted
unpickling (which runs whatever code the file names), every class the file names is replaced by an
inert stand-in: it is rebuilt as plain data (its dict items and attribute state are recorded, none
of its code runs). A file that asks to *call* anything beyond torch's tensor rebuilders and
numpy's array / scalar / dtype rebuilders (e.g. `os.system`, `builtins.eval`) is refused before
the call happens. Both torch serialization
formats are handled: the zip format (torch >= 1.6) and the legacy one
(`_use_new_zipfile_serialization=False`, older mmpretrain / mmcls files).

`.safetensors` files (a state_dict saved with `safetensors.torch.save_file`, the way the hub
shares weights) are recognized by their header, whatever their name, and read without torch:
they hold raw arrays and nothing to execute (needs the `hub` extra).

Unwrapping: a raw state_dict, {'model': ...} (the authors' training checkpoints), {'state_dict':
...} (mmpretrain / mmengine), EMA weights ({'model_ema'}, {'ema'}, ... only when asked), and a
`module.` prefix (DistributedDataParallel). Key renaming between layouts belongs to each model
family's key map (e.g. `repmlp_jax.pytorch.keys_repmlpnet`).
"""

import _compat_pickle
import collections
import dataclasses
import io
import os
import pickle
import pickletools
import zipfile
from typing import Any, Mapping

import numpy as np

from repmlp_jax import hub
from repmlp_jax import storage

# Keys holding the model's weights in checkpoints that wrap them, in order of preference.
MODEL_KEYS = ('model', 'state_dict', 'module', 'net', 'network')
EMA_KEYS = ('model_ema', 'state_dict_ema', 'ema_state_dict', 'ema', 'ema_model')
# The CPU build first (an unpinned `pip install torch` pulls a multi-GB CUDA build), then the
# extra from the checkout (the package is installed from its source, not from PyPI).
TORCH_EXTRA = ("pip install torch --index-url https://download.pytorch.org/whl/cpu, then "
               "pip install -e '.[torch]' in the repmlp-jax checkout")
# The first bytes of a legacy (non-zip) torch.save file: PROTO 2, then the magic number as LONG1.
_LEGACY_HEADER = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


class CheckpointFileError(ValueError):
  """A file is not a readable PyTorch checkpoint (not one, truncated, or unsafe to load)."""


class UnsafeCheckpointError(CheckpointFileError):
  """A checkpoint's pickle asks to call code that is not needed to rebuild tensors; refused."""


@dataclasses.dataclass
class TorchFile:
  """What was read from a checkpoint and where in it the weights were found."""
  state_dict: dict[str, np.ndarray]  # Flat name -> array, wrapper keys and prefixes removed.
  source: str  # The file, or '<state_dict>' for an in-memory dict.
  format: str  # 'zip', 'legacy', 'safetensors' or 'in-memory'.
  entry: str  # Where the weights were: 'top level', "'model'", "'model_ema'", ...
  stripped_prefix: str  # '' or 'module.'.
  other_entries: tuple[str, ...]  # The checkpoint's other top-level keys (optimizer, config...).
  ema_available: tuple[str, ...]  # EMA entries present in the file (used or not).

  def describe(self) -> str:
    """A one-line summary for users (what was read, from where)."""
    parts = [f'{self.source} ({self.format}): weights from {self.entry}']
    if self.stripped_prefix:
      parts.append(f'prefix {self.stripped_prefix!r} removed')
    unused_ema = [k for k in self.ema_available if f"'{k}'" != self.entry]
    if unused_ema:
      parts.append(f'EMA weights {unused_ema} present but not used (use_ema=True / --ema)')
    return '; '.join(parts)


def require_torch():
  """Imports torch, or explains how to install the optional dependency."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading or writing PyTorch checkpoints needs PyTorch, an optional '
                      f'dependency of repmlp-jax: {TORCH_EXTRA}.') from e
  return torch


class _RefuseCalls(type):
  """Metaclass of the stand-ins: calling one (pickle's REDUCE) is refused before anything runs."""

  def __call__(cls, *args, **kwargs):
    del args, kwargs
    raise UnsafeCheckpointError(
        f'The checkpoint asks to call {cls.pickle_name} while loading; that would run code from '
        'the file, so it was refused and nothing was executed. Re-save the weights as a plain '
        'state_dict (torch.save(model.state_dict(), path)) from a trusted environment.')


class InertObject(metaclass=_RefuseCalls):
  """Stand-in for a class named in a checkpoint: its instances are rebuilt as plain data.

  Rebuilding an instance (pickle's NEWOBJ) calls only `__new__`, which returns an OrderedDict
  tagged with the class name; torch's restricted unpickler then fills its items (a dict subclass
  such as yacs' CfgNode) and its attribute state, without running any code of the real class.
  """
  pickle_name = '?'

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    data = collections.OrderedDict()
    data.__dict__['pickled_class'] = cls.pickle_name
    return data


def _inert_class(full_name: str) -> type:
  return _RefuseCalls(full_name.rsplit('.', 1)[-1], (InertObject,), {'pickle_name': full_name})


def _numpy_globals() -> dict[str, Any]:
  """numpy's own rebuilders of arrays, scalars and dtypes (metadata such as accuracies, message
  hubs): they build data and call nothing else, like torch's tensor rebuilders."""
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # numpy < 2
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  table = {'numpy.dtype': np.dtype, 'numpy.ndarray': np.ndarray}
  for package in ('numpy._core', 'numpy.core'):  # Files written under numpy 2 or 1.
    table[f'{package}.multiarray.scalar'] = multiarray.scalar
    reconstruct = multiarray._reconstruct  # pylint: disable=protected-access
    table[f'{package}.multiarray._reconstruct'] = reconstruct
  # A dtype is rebuilt as numpy.dtype(...) then given its state, which needs its class.
  for name in dir(np.dtypes):
    cls = getattr(np.dtypes, name)
    if isinstance(cls, type) and issubclass(cls, np.dtype):
      table[f'numpy.dtypes.{name}'] = cls
  return table


def _is_safetensors(head: bytes) -> bool:
  # A safetensors file opens with its JSON header's length (little-endian uint64), then '{'.
  return len(head) > 8 and 2 <= int.from_bytes(head[:8], 'little') < 2**30 and head[8:9] == b'{'


def _file_format(path: str) -> str:
  with open(path, 'rb') as f:
    head = f.read(len(_LEGACY_HEADER))
  if not head:
    raise CheckpointFileError(f'{path} is empty; it is not a PyTorch checkpoint.')
  if _is_safetensors(head):
    return 'safetensors'
  if head.startswith(b'PK'):
    if not zipfile.is_zipfile(path):
      raise CheckpointFileError(f'{path} looks like a torch.save zip file but its archive is '
                                'incomplete: the file is truncated or corrupt. Download it again.')
    return 'zip'
  if head == _LEGACY_HEADER:
    return 'legacy'
  raise CheckpointFileError(
      f'{path} is not a PyTorch checkpoint (neither the torch.save zip format, the legacy '
      'format nor safetensors). Expected a .pth / .pt file written by torch.save, or a '
      '.safetensors file.')


def _pickle_globals(stream) -> set[str]:
  """The 'module.name' of every GLOBAL in one pickle of `stream`, read without executing it."""
  names = set()
  try:
    for opcode, arg, _ in pickletools.genops(stream):
      if opcode.name == 'GLOBAL':
        module, name = arg.split(' ', 1)
        # Protocol 2 writes Python 2 names (__builtin__.eval); unpickling maps them as torch does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
          module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        names.add(f'{module}.{name}')
      elif opcode.name == 'STACK_GLOBAL':
        raise UnsafeCheckpointError('The checkpoint uses pickle features torch.save does not '
                                    'write (STACK_GLOBAL); refusing to load it.')
  except (ValueError, EOFError) as e:
    raise CheckpointFileError(f'The checkpoint is truncated or corrupt ({e}).') from e
  return names


def _globals_in_file(path: str, fmt: str) -> set[str]:
  if fmt == 'zip':
    try:
      with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
        if len(pkl) != 1:
          raise CheckpointFileError(f'{path} is a zip file but not a torch.save checkpoint '
                                    '(no single data.pkl inside; a TorchScript archive?).')
        return _pickle_globals(io.BytesIO(archive.read(pkl[0])))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise CheckpointFileError(f'{path} is truncated or corrupt: {e}') from e
  names = set()
  with open(path, 'rb') as f:
    for _ in range(4):  # magic number, protocol version, system info, the object itself.
      names |= _pickle_globals(f)
  return names


def load_file(path: str | os.PathLike) -> tuple[Any, str]:
  """Loads a torch.save file without executing code from it.

  Args:
    path: a .pth / .pt file (zip or legacy format), local or gs://.
  Returns:
    (the unpickled object with tensors on the CPU, the format: 'zip' or 'legacy').
  Raises:
    CheckpointFileError: not a checkpoint, truncated, or unsafe (UnsafeCheckpointError).
  """
  torch = require_torch()
  path = os.fspath(path)
  if storage.is_remote(path):
    with storage.local_file(path) as local:
      return load_file(local)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  fmt = _file_format(path)
  if fmt == 'safetensors':
    raise CheckpointFileError(f'{path} is a safetensors file, not a torch.save pickle; read it '
                              'with read_torch_checkpoint (or repmlp_jax.load_torch).')
  names = _globals_in_file(path, fmt)
  # torch's own allow-list (tensor rebuild functions, OrderedDict, dtypes...) takes precedence;
  # numpy's data rebuilders are allowed; every other name becomes an inert stand-in.
  numpy_globals = _numpy_globals()
  allowed = [(obj, n) for n, obj in numpy_globals.items()]
  allowed += [(_inert_class(n), n) for n in sorted(names) if n not in numpy_globals]
  try:
    with torch.serialization.safe_globals(allowed):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except UnsafeCheckpointError:
    raise
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f'{path} cannot be loaded without running code from it, so it was refused and nothing '
        f'was executed ({_unpickler_reason(e)}). Re-save the weights as a plain state_dict '
        '(torch.save(model.state_dict(), path)) from a trusted environment.') from e
  except (EOFError, RuntimeError, ValueError, TypeError, OSError, zipfile.BadZipFile) as e:
    raise CheckpointFileError(f'{path} is truncated or corrupt and cannot be read: {e}') from e
  return obj, fmt


def _unpickler_reason(error: Exception) -> str:
  # torch's message suggests weights_only=False, i.e. running the file's code; keep only the why.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for line in lines:
    if 'WeightsUnpickler error:' in line:
      line = line.split('WeightsUnpickler error:', 1)[1].strip()
      return line.split(' Please use `torch.serialization', 1)[0] or 'refused by torch'
    if line.startswith(('Trying to', 'Unsupported', 'Can only')):
      return line
  return lines[-1] if lines else 'refused by torch'


def _is_tensor_dict(obj: Any) -> bool:
  torch = require_torch()
  return (isinstance(obj, Mapping) and bool(obj)
          and all(isinstance(k, str) for k in obj)
          and any(isinstance(v, torch.Tensor) for v in obj.values()))


def to_numpy(tensor) -> np.ndarray:
  """A CPU copy of a torch tensor; bfloat16 (unknown to numpy) becomes float32."""
  torch = require_torch()
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.numpy().copy()


def unwrap(obj: Any, *, use_ema: bool = False) -> tuple[Mapping[str, Any], str, tuple, tuple]:
  """Finds the weights inside a loaded checkpoint.

  Args:
    obj: what `load_file` returned (or a state_dict given in memory).
    use_ema: take the EMA weights (an error if the checkpoint has none).
  Returns:
    (state_dict, entry description, other top-level keys, EMA entries present).
  """
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f'The checkpoint holds a {type(obj).__name__}, not a state_dict '
                              'or a dict of them; save model.state_dict() instead.')
  keys = tuple(str(k) for k in obj)
  ema = tuple(k for k in EMA_KEYS if k in obj and _is_tensor_dict(_strip_mmengine_ema(obj[k])))
  if use_ema:
    if not ema:
      raise CheckpointFileError(f'use_ema was requested but the checkpoint has no EMA weights '
                                f'(top-level keys: {list(keys)}).')
    return _strip_mmengine_ema(obj[ema[0]]), f"'{ema[0]}'", _others(keys, ema[0]), ema
  if _is_tensor_dict(obj) and not any(k in obj for k in MODEL_KEYS + EMA_KEYS):
    return obj, 'top level', (), ()
  for k in MODEL_KEYS:
    if k in obj and _is_tensor_dict(obj[k]):
      return obj[k], f"'{k}'", _others(keys, k), ema
  raise CheckpointFileError(
      'No state_dict found in the checkpoint: expected a dict of tensors, or one under '
      f'{list(MODEL_KEYS)} (EMA: {list(EMA_KEYS)}); its top-level keys are {list(keys)}.')


def _others(keys: tuple, used: str) -> tuple:
  return tuple(k for k in keys if k != used)


def _strip_mmengine_ema(sd: Any) -> Any:
  # mmengine's EMA hook stores the averaged model under 'ema_state_dict' with a 'steps' counter.
  if isinstance(sd, Mapping) and 'steps' in sd:
    return {k: v for k, v in sd.items() if k != 'steps'}
  return sd


def strip_prefix(sd: Mapping[str, Any], prefix: str = 'module.') -> tuple[dict[str, Any], str]:
  """Removes `prefix` when every key carries it (DistributedDataParallel checkpoints)."""
  if sd and all(k.startswith(prefix) for k in sd):
    return {k[len(prefix):]: v for k, v in sd.items()}, prefix
  return dict(sd), ''


def read_safetensors_state_dict(path: str, *, use_ema: bool = False) -> TorchFile:
  """Reads a state_dict saved as .safetensors (flat names, no wrappers) without torch.

  Args:
    path: the .safetensors file.
    use_ema: refused: such a file holds one state_dict, with no EMA entries beside it.
  Returns:
    TorchFile: the arrays (a `module.` prefix removed) and where they came from.
  """
  if use_ema:
    raise CheckpointFileError(f'EMA weights were requested but {path} is a safetensors file, '
                              'which holds a single state_dict (no EMA entries); drop --ema / '
                              'use_ema.')
  try:
    arrays, _ = hub.read_safetensors(path)
  except hub.PretrainedError as e:
    raise CheckpointFileError(str(e)) from e
  if not arrays:
    raise CheckpointFileError(f'{path} holds no tensors; expected a state_dict.')
  sd, prefix = strip_prefix(arrays)
  return TorchFile(sd, path, 'safetensors', 'top level', prefix, (), ())


def read_torch_checkpoint(path_or_state_dict: Any, *, use_ema: bool = False) -> TorchFile:
  """Reads a checkpoint file (or an in-memory state_dict) into a flat numpy state_dict.

  Args:
    path_or_state_dict: a .pth / .pt / .safetensors path (local or gs://), or a mapping (a
      state_dict or a checkpoint dict).
    use_ema: take the EMA weights instead of the model's.
  Returns:
    TorchFile: the arrays (keys as stored, minus wrappers and a `module.` prefix) and where they
    came from.
  """
  if not isinstance(path_or_state_dict, Mapping) and storage.is_remote(path_or_state_dict):
    with storage.local_file(path_or_state_dict) as local:
      return dataclasses.replace(read_torch_checkpoint(local, use_ema=use_ema),
                                 source=os.fspath(path_or_state_dict))
  if (not isinstance(path_or_state_dict, Mapping)
      and os.path.isfile(os.fspath(path_or_state_dict))
      and _file_format(os.fspath(path_or_state_dict)) == 'safetensors'):
    return read_safetensors_state_dict(os.fspath(path_or_state_dict), use_ema=use_ema)
  torch = require_torch()
  if isinstance(path_or_state_dict, Mapping):
    obj, source, fmt = path_or_state_dict, '<state_dict>', 'in-memory'
  else:
    source = os.fspath(path_or_state_dict)
    obj, fmt = load_file(source)
  sd, entry, others, ema = unwrap(obj, use_ema=use_ema)
  sd, prefix = strip_prefix(sd)
  not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise CheckpointFileError(f'The state_dict holds entries that are not tensors: {not_tensors}.')
  arrays = {k: to_numpy(v) for k, v in sd.items()}
  return TorchFile(arrays, source, fmt, entry, prefix, others, ema)
