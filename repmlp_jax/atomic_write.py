"""Writing a file that must not exist yet, atomically: complete under its name, or absent.

The content goes to a temporary file in the same directory, is flushed to disk, then linked to
its name: `os.link` fails if the name appeared meanwhile, so an existing file is never replaced
and an interrupted write leaves nothing behind under the final name. The file's mode follows the
umask, as for any file the user creates.
"""

import os
import secrets
from typing import BinaryIO, Callable

from repmlp_jax import outputs


def write_new_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Creates `path` with what `write(file)` writes, atomically; never replaces a file.

  Args:
    path: the file to create; its directory must exist.
    write: called once with the open binary temporary file.
  Returns:
    The absolute path written.
  Raises:
    outputs.WriteError: the disk filled up (one line; no temporary file is left).
  """
  path = outputs.check_new_output(path)
  tmp = os.path.join(os.path.dirname(path),
                     f'.{os.path.basename(path)}.{secrets.token_hex(4)}.tmp')
  # os.open with 0o666 lets the umask decide the mode (tempfile.mkstemp would force 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with outputs.writing(path):
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
