"""Writing a file that must not exist yet, atomically: complete under its name, or absent.

The content goes to a temporary file in the same directory, is flushed to disk, then linked to
its name: `os.link` fails if the name appeared meanwhile, so an existing file is never replaced
and an interrupted write leaves nothing behind under the final name.
"""

import os
import tempfile
from typing import BinaryIO, Callable


def check_new_path(path: str | os.PathLike) -> str:
  """The absolute path, after checking that it does not exist and its directory does."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise FileExistsError(f'{path} already exists; choose another output file.')
  directory = os.path.dirname(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'The output directory {directory} does not exist; create it first.')
  return path


def write_new_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Creates `path` with what `write(file)` writes, atomically; never replaces a file.

  Args:
    path: the file to create; its directory must exist.
    write: called once with the open binary temporary file.
  Returns:
    The absolute path written.
  """
  path = check_new_path(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
    except FileExistsError:
      raise FileExistsError(f'{path} was created by another process while writing; not '
                            'replaced.') from None
  finally:
    os.unlink(tmp)
  return path
