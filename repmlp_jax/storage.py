"""Where files live: a local path or a `gs://` URL, through one path layer (etils.epath).

Every place the package reads or writes a file or a directory (the workdir, checkpoints, model
directories, exports, PyTorch files, `init_from`) turns the user's string into a path with
`resolve`: a local path becomes absolute, a `gs://bucket/...` URL stays as it is and is read and
written through gcsfs (the `gcs` extra), the same for the package's files and orbax's. orbax
writes its arrays to gs:// itself, through TensorStore.

On a bucket there are no directories and no atomic renames, but an object appears whole when its
upload completes and an upload can be made conditional on the name being free (GCS's
ifGenerationMatch=0). `outputs` builds its never-overwrite writes on that.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

GCS_EXTRA = "pip install -e '.[gcs]'"
_AUTH_HINT = ('check the credentials (`gcloud auth application-default login`, or '
              'GOOGLE_APPLICATION_CREDENTIALS) and your access to the bucket')

# epath sends gs:// through tf.io.gfile whenever TensorFlow is importable, gcsfs otherwise. One
# client for every gs:// file, the one the tests run against: gcsfs (EPATH_USE_TF=true restores
# epath's choice).
os.environ.setdefault('EPATH_USE_TF', 'false')


class StorageError(OSError):
  """A bucket cannot be reached (credentials, permissions); the message is one line."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (a URL such as gs://bucket/...), not the local disk."""
  return '://' in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """The path of a local file or directory (made absolute) or of a gs:// object or prefix.

  Raises:
    ValueError: a URL scheme other than gs://.
    ImportError: a gs:// URL without gcsfs installed; the message names the extra.
  """
  text = os.fspath(path)
  if not is_remote(text):
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if not text.startswith('gs://'):
    raise ValueError(f'{text}: only local paths and gs:// URLs are supported.')
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ImportError(f'{text} is in Google Cloud Storage, which needs gcsfs: '
                      f'{GCS_EXTRA}.') from None
  return epath.Path(text)


def name(path: str | os.PathLike) -> str:
  """How `path` is shown to users and returned by writers: absolute, or the gs:// URL."""
  return os.fspath(resolve(path))


def gcs(path: epath.Path):
  """The gcsfs file system epath (and so orbax) uses for `path`: one listing cache for both."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  return backend.fsspec_backend.fs(os.fspath(path))


def error_line(error: BaseException, path: str | os.PathLike) -> str | None:
  """One line for a credential or permission error reaching `path`, or None for other errors."""
  auth_errors = ()
  try:
    from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
    auth_errors = (auth_exceptions.GoogleAuthError,)
  except ImportError:
    pass
  where = os.fspath(path)
  if auth_errors and isinstance(error, auth_errors):
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f'Cannot access {where}: no usable Google Cloud credentials ({reason}); {_AUTH_HINT}.'
  code = getattr(error, 'code', None)
  if code in (401, 403) or str(error).startswith('Forbidden'):
    what = 'not authenticated' if code == 401 else 'permission denied'
    return f'Cannot access {where}: {what}; {_AUTH_HINT}.'
  return None


@contextlib.contextmanager
def reaching(path: str | os.PathLike) -> Iterator[None]:
  """Turns credential and permission errors of a bucket into a one-line StorageError."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (gcsfs and google.auth raise their own)
    line = error_line(e, path) if is_remote(path) else None
    if line is None:
      raise
    raise StorageError(line) from None


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
  """A local file holding the bytes of `path`: the file itself, or a download of the object.

  For readers that need a real file (torch.load, safetensors, zipfile, onnxruntime).
  """
  if not is_remote(path):
    yield os.fspath(resolve(path))
    return
  source = resolve(path)
  with reaching(path):
    if not source.is_file():
      raise FileNotFoundError(f'No file at {source}.')
    with tempfile.TemporaryDirectory(prefix='repmlp-jax-') as tmp:
      local = os.path.join(tmp, source.name)
      with source.open('rb') as src, open(local, 'wb') as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
      yield local


def make_dirs(path: epath.Path) -> None:
  """Creates the directory `path` and its missing parents, as `mkdir -p`.

  Nothing on a bucket, which has no directories (and gcsfs would create a missing bucket).
  """
  if not is_remote(path):
    path.mkdir(parents=True, exist_ok=True)


def make_parents(path: epath.Path) -> None:
  """Creates the missing parent directories of `path` (nothing on a bucket)."""
  make_dirs(path.parent)


def move(source: epath.Path, target: epath.Path) -> None:
  """Moves a file or a directory (every object under a prefix, on a bucket) to `target`."""
  if is_remote(source):
    with reaching(source):
      gcs(source).mv(os.fspath(source), os.fspath(target), recursive=True)
  else:
    os.rename(source, target)
