"""One short run of the digits config, trained once per test process and shared by the tests
that read what a run writes (its checkpoints, deploy model, metrics and last line)."""

import contextlib
import dataclasses
import functools
import io
import os
import shutil
import tempfile
import atexit

from configs import digits
from repmlp_jax.train import trainer

TOTAL_STEPS = 4


def config():
  """configs/digits.py for TOTAL_STEPS steps, evaluated at the end, a checkpoint every 2."""
  c = digits.get_config()
  c.num_train_steps = TOTAL_STEPS
  c.eval_every_epochs = 100.0  # Evaluate at the end only.
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.profile_steps = '2,3'  # A two-step jax.profiler trace (resumed runs start past it).
  return c


@functools.cache
def experiment() -> trainer.experiment.Experiment:
  """The Experiment of `config()`, built (and compiled) once per test process."""
  return trainer.build_experiment(config())


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  result: dict
  stdout: str  # What the run printed (progress lines go to the same stream when not a terminal).


@functools.cache
def run() -> Run:
  """Trains `config()` into a temporary workdir (removed when the process exits)."""
  workdir = tempfile.mkdtemp(prefix='repmlp-digits-run-')
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = trainer.train_and_evaluate(config(), workdir, exp=experiment())
  print(out.getvalue(), end='')  # Still shown by pytest on a failure.
  return Run(workdir, result, out.getvalue())


def path(*parts: str) -> str:
  """A path inside the run's workdir."""
  return os.path.join(run().workdir, *parts)
