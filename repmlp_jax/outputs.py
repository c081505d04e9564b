"""Where results are written: checked before any heavy work, and failed writes told in one line.

Every tool that writes (train.py's workdir, convert.py's outputs, predict.py --export,
model_io.save_model) asks `check_new_output` or `check_workdir` first, so a taken or impossible
path is refused before a model is loaded or anything compiles. A write that fails midway (a full
disk, a file system turned read-only) goes through `writing`, which removes what the write left
behind (orbax's temporary directories, a temporary file) and raises `WriteError`, whose message
is one line naming the path and the reason.
"""

import contextlib
import errno
import os
import shutil
import tempfile
import time
from typing import Iterator

# orbax writes `<final name>.orbax-checkpoint-tmp[-<timestamp>]` and renames it when complete.
ORBAX_TMP_SUFFIX = '.orbax-checkpoint-tmp'

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
  """A write failed; the message is one line that names the path and what to do."""

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


def check_new_output(path: str | os.PathLike, *, overwrite: bool = False) -> str:
  """The absolute path of an output to create, after checking it can be created.

  Args:
    path: a file or directory that must not exist yet (unless `overwrite`).
    overwrite: an existing output may be replaced.
  Returns:
    The absolute path.
  Raises:
    FileExistsError: it exists (and may not be replaced).
    FileNotFoundError: its parent directory does not exist.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    hint = ' or pass --overwrite' if os.path.isdir(path) else ''
    raise FileExistsError(f'{path} already exists; choose another output path{hint}.')
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'The output directory {parent} does not exist; create it first.')
  return path


def check_workdir(workdir: str | os.PathLike) -> str:
  """Creates `workdir` if needed and proves that files can be written in it.

  A probe file is created and removed (permission bits alone do not tell: root ignores them, and
  a read-only mount keeps them).

  Args:
    workdir: the training run's directory.
  Returns:
    Its absolute path.
  Raises:
    WriteError: it cannot be created or written; one line.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir, prefix='.write-test-'):
      pass
  except OSError as e:
    raise WriteError(f'Cannot write to the workdir {workdir} ({_reason(e)}); choose another '
                     '--workdir or fix its permissions.', e.errno) from None
  return workdir


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it) says the disk or the quota is full.

  orbax reports it through tensorstore as a ValueError ('RESOURCE_EXHAUSTED: Error writing ...
  No space left on device'), Python as OSError(ENOSPC).
  """
  seen = set()
  pending = [error]
  while pending:
    e = pending.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    if 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e):
      return True
    pending.extend(getattr(e, 'exceptions', ()))  # ExceptionGroup from asyncio tasks.
    pending.extend((e.__cause__, e.__context__))
  return False


def _reason(error: BaseException) -> str:
  if is_disk_full(error):
    return 'no space left on device'
  if isinstance(error, OSError) and error.strerror:
    return error.strerror.lower()
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def remove_partial(path: str | os.PathLike) -> None:
  """Removes orbax's temporary directories for `path` (a save that did not finish)."""
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  quiet_scans = 0
  # orbax saves the items of a checkpoint concurrently: when one fails, another may still be
  # creating its folder in a thread for a moment. Clean until two scans in a row find nothing.
  for _ in range(40):
    leftovers = [e for e in (os.listdir(parent) if os.path.isdir(parent) else [])
                 if e.startswith(name + ORBAX_TMP_SUFFIX)]
    for entry in leftovers:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    quiet_scans = 0 if leftovers else quiet_scans + 1
    if quiet_scans == 2:
      return
    time.sleep(0.05)


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, kept: str = '') -> Iterator[None]:
  """Runs a write of `path`; if it fails with a full disk, cleans up and says so in one line.

  Args:
    path: the file or directory being written.
    kept: what is still safe, appended to the message (e.g. 'the last good checkpoint is ...').
  Raises:
    WriteError: the write failed for lack of space or permission; nothing partial is left.
  """
  try:
    yield
  except Exception as e:  # orbax and tensorstore raise ValueError / Exception for I/O errors.
    remove_partial(path)
    if not (is_disk_full(e) or isinstance(e, (PermissionError, IsADirectoryError))):
      raise
    message = f'Cannot write {os.path.abspath(os.fspath(path))}: {_reason(e)}'
    if kept:
      message += f'; {kept}'
    raise WriteError(message + '.', errno.ENOSPC if is_disk_full(e) else e.errno) from None
