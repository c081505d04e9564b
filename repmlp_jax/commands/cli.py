"""What the command-line tools share: exit statuses, one-line errors, a quiet TensorFlow start.

Exit statuses of train.py (convert.py and predict.py use 0, 1 and 2 the same way):
  0   done.
  1   an error (bad input, damaged or incompatible checkpoints, a full disk): one line on stderr.
  2   a usage error (unknown flag or config field, missing config file, a config that cannot
      work as given, e.g. programs that do not fit the TPU chips' memory): one line on stderr.
  75  stopped on request (SIGTERM, Ctrl-C, a preemption notice) after saving a checkpoint; the
      same command resumes. 75 is EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), and
      it is distinct from 143 (128 + SIGTERM: killed before a checkpoint was saved), so a
      scheduler can requeue on it alone: SLURM `RequeueExit=75` (slurm.conf) or
      `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID` in the batch script, LSF `bsub -Q 75`,
      a Kubernetes / JobSet podFailurePolicy rule `onExitCodes: {operator: In, values: [75]}`.
"""

import contextlib
import os
import sys
from typing import TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL.


class ConfigError(ValueError):
  """A config that cannot work as given: the user must change its fields (exit EXIT_USAGE)."""


def exit_status(error: BaseException) -> int:
  """The exit status of a run that stopped on `error` (one of the errors said in one line)."""
  return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_ERROR


def error(prog: str, message: object, *, file: TextIO | None = None) -> None:
  """Prints `prog: error: message` (the errors meant for users say it in one line; a key
  mismatch report keeps its few lines)."""
  text = str(message).strip() or type(message).__name__
  print(f'{prog}: error: {text}', file=file or sys.stderr)


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
