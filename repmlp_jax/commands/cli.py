"""What the command-line tools share: exit statuses, one-line errors, quiet library start-up.

The exit statuses of train.py, convert.py and predict.py are defined here and documented in the
README (The commands: exit statuses): 0 done, 1 a failure while working, 2 a usage error, 75
stopped on request after saving a checkpoint (sysexits.h EX_TEMPFAIL, distinct from 143 = killed
by SIGTERM before saving, so that a scheduler can requeue on it alone).

This module imports nothing of the package at its top: train.py reads it before jax loads.
"""

import contextlib
import logging
import os
import sys
from typing import TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL.

# What the user must change (an argument, an input, the model asked for): the library raises
# these for bad input. Other errors (a failed write, an I/O error, FloatingPointError) are
# failures while working.
_USAGE_ERRORS = (ValueError, KeyError, ImportError, FileNotFoundError, FileExistsError,
                 NotADirectoryError, IsADirectoryError, PermissionError)


def exit_status(error: BaseException) -> int:
  """EXIT_USAGE for a usage error, EXIT_ERROR for a failure while working (a full disk)."""
  from repmlp_jax import outputs  # pylint: disable=g-import-not-at-top  (loads jax)
  if isinstance(error, outputs.WriteError) or outputs.is_disk_full(error):
    return EXIT_ERROR
  return EXIT_USAGE if isinstance(error, _USAGE_ERRORS) else EXIT_ERROR


class ConfigError(ValueError):
  """A config that cannot work as given: the user must change its fields (exit EXIT_USAGE)."""


def error(prog: str, message: object, *, file: TextIO | None = None) -> None:
  """Prints `prog: error: message` (the errors meant for users say it in one line; a key
  mismatch report keeps its few lines)."""
  text = str(message).strip() or type(message).__name__
  print(f'{prog}: error: {text}', file=file or sys.stderr)


class _NotFrom(logging.Filter):
  """Drops log records written by the code under a directory."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.startswith(self.directory)


def hide_orbax_logs() -> None:
  """Keeps orbax's log records off the terminal (train.py without --verbosity, convert.py,
  predict.py).

  Every save logs at INFO, and a failed save logs each of its background threads' tracebacks at
  ERROR, about a hundred lines, before the error reaches the command, which says it in one line.
  orbax logs through absl's logger; the root logger's handlers catch anything else of it.
  """
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(os.path.dirname(os.path.abspath(orbax.checkpoint.__file__)))
  for where in [logging.getLogger('absl')] + logging.getLogger().handlers:
    if not any(isinstance(f, _NotFrom) for f in where.filters):
      where.addFilter(_NotFrom(directory + os.sep))


@contextlib.contextmanager
def _stderr_to_devnull():
  """Sends file descriptor 2 to /dev/null meanwhile (C++ libraries write there directly)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow_quietly():
  """Imports TensorFlow without its start-up lines and returns the module.

  TensorFlow's C++ libraries log 'oneDNN custom operations are on' and absl's 'All log messages
  before absl::InitializeLog()' while they load, before TF_CPP_MIN_LOG_LEVEL is read; they go
  straight to file descriptor 2, so only silencing it during the import keeps them out. An
  import that fails still raises (its Python traceback is printed after stderr is back).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  with _stderr_to_devnull():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf
