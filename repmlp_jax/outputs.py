"""Where results are written: checked before any heavy work, written whole or not at all, never
over an existing output, and failed writes told in one line.

Every tool that writes (train.py's workdir, convert.py's outputs, predict.py --export, save_model,
save_pretrained, the PyTorch / ONNX / jax.export files) asks `check_new_output` or
`check_workdir` first, so a taken or impossible path is refused before a model is loaded or
anything compiles; missing parent directories are made when the output is written, as
`mkdir -p` would. Paths are local or gs:// (`repmlp_jax.storage`).

The one way to write a new output: `write_new_file` (one file) and `write_new_directory` (a few
files under a new name). On the local disk the content goes to a temporary name next to the
output, then is linked or renamed to it, which fails if the name was taken meanwhile. On a bucket
each object is uploaded on the condition that its name is free (ifGenerationMatch=0) and appears
whole when the upload completes; a directory's files are uploaded in the order given, the last
one marking it complete. orbax writes its own checkpoints; a write that fails midway (a full
disk, a file system turned read-only) runs inside `writing`, which removes what the write left
and raises `WriteError`, whose message is one line naming the path and the reason.
"""

import contextlib
import errno
import io
import os
import secrets
import shutil
import time
import warnings
from typing import BinaryIO, Callable, Iterator, Mapping

from etils import epath

from repmlp_jax import storage

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
  """A write failed; the message is one line that names the path and what to do."""

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


def check_new_output(path: str | os.PathLike, *, overwrite: bool = False) -> str:
  """The absolute path (or gs:// URL) of an output to create, after checking it can be created.

  Args:
    path: a file or directory that must not exist yet (unless `overwrite`). Missing parent
      directories are fine: the writers create them.
    overwrite: an existing output may be replaced.
  Returns:
    The absolute path or URL.
  Raises:
    FileExistsError: it exists (and may not be replaced).
    NotADirectoryError: one of its parents is a file.
  """
  target = storage.resolve(path)
  with storage.reaching(target):
    if target.exists() and not overwrite:
      hint = ' or pass --overwrite' if target.is_dir() else ''
      raise FileExistsError(f'{target} already exists; choose another output path{hint}.')
    if not storage.is_remote(target):
      parent = target.parent
      while not parent.exists():
        parent = parent.parent
      if not parent.is_dir():
        raise NotADirectoryError(f'{parent} is a file, so {target} cannot be created in it; '
                                 'choose another output path.')
  return os.fspath(target)


def check_workdir(workdir: str | os.PathLike) -> str:
  """Creates `workdir` if needed and proves that files can be written in it.

  A probe file is created and removed (permission bits alone do not tell: root ignores them, and
  a read-only mount keeps them; on a bucket, it proves the credentials and the bucket).

  Args:
    workdir: the training run's directory, local or gs://.
  Returns:
    Its absolute path or URL.
  Raises:
    WriteError: it cannot be created or written; one line.
  """
  path = storage.resolve(workdir)
  probe = path / f'.write-test-{secrets.token_hex(4)}'
  try:
    with storage.reaching(path):
      storage.make_dirs(path)
      probe.write_bytes(b'')
      probe.unlink()
  except storage.StorageError:
    raise
  except OSError as e:
    reason = _reason(e)
    if storage.is_remote(path) and isinstance(e, FileNotFoundError):
      reason = f'there is no bucket {os.fspath(path).split("/")[2]}'  # gcsfs names a URL.
    raise WriteError(f'Cannot write to the workdir {path} ({reason}); choose another '
                     '--workdir or fix its permissions.', e.errno) from None
  return os.fspath(path)


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


def _entries(directory: epath.Path) -> set[str]:
  try:
    return {p.name for p in directory.iterdir()}
  except (FileNotFoundError, NotADirectoryError):
    return set()


def _remove(path: epath.Path) -> None:
  try:
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink()
  except FileNotFoundError:
    pass
  except OSError as e:  # A writer's thread still adding to the folder: the next scan retries.
    if e.errno != errno.ENOTEMPTY:
      raise


def _remove_new_entries(directory: epath.Path, before: set[str]) -> None:
  """Removes what appeared in `directory` since `before` was listed (a failed write's leftovers).

  A writer such as orbax saves the items of a checkpoint concurrently: when one fails, another
  may still be creating its folder in a thread for a moment. Cleans until two scans in a row
  find nothing new; warns if entries still appear after 40 scans.
  """
  quiet_scans = 0
  for _ in range(40):
    leftovers = _entries(directory) - before
    for entry in leftovers:
      _remove(directory / entry)
    quiet_scans = 0 if leftovers else quiet_scans + 1
    if quiet_scans == 2:
      return
    time.sleep(0.05)
  warnings.warn(f'A failed write kept creating entries in {directory} through 2 s of cleaning; '
                f'check there for its leftovers (the last scan removed '
                f'{", ".join(sorted(leftovers))}).', RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, kept: str = '') -> Iterator[None]:
  """Runs a write of `path`; if it fails, removes what it left, and a full disk is one line.

  Args:
    path: the file or directory being written.
    kept: what is still safe, appended to the message (e.g. 'the last good checkpoint is ...').
  Raises:
    WriteError: the write failed for lack of space or permission; nothing partial is left.
  """
  target = storage.resolve(path)
  before = _entries(target.parent)
  try:
    yield
  except Exception as e:  # orbax and tensorstore raise ValueError / Exception for I/O errors.
    _remove_new_entries(target.parent, before)
    if not (is_disk_full(e) or isinstance(e, (PermissionError, IsADirectoryError))):
      raise
    message = f'Cannot write {target}: {_reason(e)}'
    if kept:
      message += f'; {kept}'
    raise WriteError(message + '.', errno.ENOSPC if is_disk_full(e) else e.errno) from None


def write_new_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Creates `path` with what `write(file)` writes, atomically; never replaces a file.

  Args:
    path: the file to create, local or gs://; missing parent directories are created.
    write: called once with an open binary file.
  Returns:
    The absolute path or URL written.
  Raises:
    FileExistsError: `path` exists, or was created by another process while writing.
    WriteError: the disk filled up (one line; no temporary file is left).
  """
  target = storage.resolve(check_new_output(path))
  if storage.is_remote(target):
    buffer = io.BytesIO()
    write(buffer)
    _upload_new(target, buffer.getvalue())
    return os.fspath(target)
  storage.make_parents(target)
  tmp = target.parent / f'.{target.name}.{secrets.token_hex(4)}.tmp'
  # os.open with 0o666 lets the umask decide the mode (tempfile.mkstemp would force 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with writing(target):
      with os.fdopen(fd, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    try:
      os.link(tmp, target)
    except FileExistsError:
      raise FileExistsError(f'{target} was created by another process while writing; not '
                            'replaced.') from None
  finally:
    os.unlink(tmp)
  return os.fspath(target)


def write_new_directory(path: str | os.PathLike, files: Mapping[str, bytes]) -> str:
  """Creates the directory `path` holding `files` (name -> content), atomically.

  Locally the files go to a temporary directory next to `path`, renamed to `path` when complete.
  On a bucket each object is uploaded on the condition that its name is free, in the order of
  `files`: put the file that marks the directory complete last.

  Args:
    path: the directory to create; it must not exist. Missing parents are created.
    files: file name -> bytes.
  Returns:
    The absolute path or URL written.
  Raises:
    FileExistsError: `path` exists, or was created by another process while writing.
  """
  target = storage.resolve(check_new_output(path))
  if storage.is_remote(target):
    written = []
    try:
      for file_name, content in files.items():
        _upload_new(target / file_name, content)
        written.append(target / file_name)
    except BaseException:
      for done in written:
        _remove(done)
      raise
    return os.fspath(target)
  storage.make_parents(target)
  tmp = target.parent / f'.{target.name}.{secrets.token_hex(4)}.tmp'
  os.mkdir(tmp, 0o777)  # The umask decides the mode, as for any directory the user creates.
  try:
    with writing(target):
      for file_name, content in files.items():
        with open(tmp / file_name, 'wb') as f:
          f.write(content)
          f.flush()
          os.fsync(f.fileno())
    # rename() replaces at most an empty directory that appeared meanwhile, never content.
    os.rename(tmp, target)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if target.exists() and not isinstance(e, WriteError):
      raise FileExistsError(f'{target} was created by another process while writing; not '
                            'replaced.') from e
    raise
  return os.fspath(target)


def _upload_new(target: epath.Path, content: bytes) -> None:
  """Uploads one object, on the condition that its name is still free (ifGenerationMatch=0)."""
  with storage.reaching(target):
    try:
      storage.gcs(target).pipe_file(os.fspath(target), content, mode='create')
    except FileExistsError:
      raise FileExistsError(f'{target} was created by another process while writing; not '
                            'replaced.') from None
