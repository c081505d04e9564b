"""A jax.profiler trace of chosen training steps (`config.profile_steps = 'START,END'`).

The trace starts before step START runs and stops once step END's work has finished on the
devices (steps are numbered from 1, as metrics.jsonl numbers them). Every host writes its own
trace, `<workdir>/profile/plugins/profile/<run>/<host>.xplane.pb`, which TensorBoard's profile
plugin (`tensorboard --logdir <workdir>/profile`) and xprof read.
"""

import os
from typing import Any

import jax

from repmlp_jax.commands import cli


def parse_steps(text: str | None) -> tuple[int, int] | None:
  """'START,END' -> (START, END); None or '' -> None. ConfigError (one line) otherwise."""
  if not text:
    return None
  parts = str(text).split(',')
  try:
    start, end = (int(p) for p in parts)
  except ValueError:
    start = end = 0
  if len(parts) != 2 or not 1 <= start <= end:
    raise cli.ConfigError(f'config.profile_steps={text!r} must be "START,END" with '
                          '1 <= START <= END, e.g. --config.profile_steps=10,12.')
  return start, end


class StepProfiler:
  """Starts and stops the trace around the configured steps of a training loop."""

  def __init__(self, steps: str | None, workdir: str):
    self._steps = parse_steps(steps)
    self.directory = os.path.join(workdir, 'profile')
    self._tracing = False

  def before_step(self, step: int) -> None:
    """Call before running step `step` (1-based)."""
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self.directory)
      self._tracing = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Call after step `step` was dispatched, with what it returned (waited for at the end)."""
    if self._tracing and step >= self._steps[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (a run that ended or stopped inside the range)."""
    if self._tracing:
      self._tracing = False
      jax.profiler.stop_trace()
