"""What a training run reports, from process 0 only: progress (images/s, ETA; a tqdm bar on a
terminal, plain lines in a log) and scalar metrics written both to TensorBoard (tf.summary,
`<workdir>/tensorboard`) and to a JSON-lines file (`<workdir>/metrics.jsonl`, one
{"step": ..., name: value, ...} per line).

A resumed run appends to the same files; TensorBoard and the JSON lines may then hold the steps
between the last checkpoint and the interruption twice (the later entries are the kept run's).

In a gs:// workdir, where objects cannot be appended to, metrics.jsonl is uploaded whole after
every write (it holds one short line per logged step); TensorBoard's event files go through
TensorFlow's own GCS client.
"""

import datetime
import json
import math
import os
import sys
import time
from typing import Mapping, TextIO

import jax
import tqdm

from repmlp_jax import storage


class MetricWriter:
  """Scalars to TensorBoard and to metrics.jsonl; a no-op on processes other than 0."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True):
    """Opens the files in `workdir` (local or gs://) on process 0.

    Args:
      workdir: the run's directory.
      enabled: whether this process writes (default: process 0 only).
      tensorboard: also write TensorBoard event files.
    """
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = self._file = None
    self._lines = None  # The whole metrics.jsonl, kept when it is uploaded whole.
    if self.enabled:
      directory = storage.resolve(workdir)
      storage.make_dirs(directory)
      self._jsonl = directory / 'metrics.jsonl'
      if storage.is_remote(directory):
        self._lines = self._jsonl.read_text(encoding='utf-8') if self._jsonl.exists() else ''
      else:
        self._file = open(self._jsonl, 'a', encoding='utf-8')
      if tensorboard:
        import tensorflow as tf  # The data pipeline's dependency; imported only where used.
        from tensorflow.core.framework import summary_pb2
        self._tf = tf
        # What TensorBoard's scalar plugin reads; written with tf.summary.write so that the
        # tensorboard package is not needed to write (only to view).
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
        self._writer = tf.summary.create_file_writer(os.fspath(directory / 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records `metrics` (name -> number) at `step`.

    Args:
      step: the training step the values belong to.
      metrics: e.g. {'train/loss': 2.3, 'eval/top1': 0.5}. Non-finite values are written as
        null in the JSON file.
    """
    if not self.enabled:
      return
    values = {name: float(value) for name, value in metrics.items()}
    if self._writer is not None:
      with self._writer.as_default(step=step):
        for name, value in values.items():
          self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                                 metadata=self._metadata)
      self._writer.flush()
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    line = json.dumps(record) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines += line
      self._jsonl.write_text(self._lines, encoding='utf-8')

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      if self._writer is not None:
        self._writer.close()
      if self._file is not None:
        self._file.close()
      self.enabled = False


class ProgressBar:
  """Progress on process 0: a tqdm bar on a terminal, plain lines in a log.

  The clock starts after the first step of this start, so neither the compilation nor a resume's
  already finished steps enter images/s and the ETA. When stderr is not a terminal (a log file,
  a scheduler's output), carriage-return redraws would fill the log: instead one plain line is
  printed at a logged step once `interval_s` seconds have passed since the previous one.
  """

  def __init__(self, *, total_steps: int, start_step: int, images_per_step: int,
               enabled: bool | None = None, interactive: bool | None = None,
               interval_s: float = 60.0, stream: TextIO | None = None):
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._stream = stream
    if interactive is None:
      interactive = sys.stderr.isatty()
    self._interactive = interactive
    self._total, self._images_per_step = total_steps, images_per_step
    self._step = start_step
    self._interval_s = interval_s
    self._bar = None
    self._clock: tuple[float, int] | None = None  # (time, step) when the clock started.
    self._last_line = -math.inf

  def update(self, step: int, **postfix: float) -> None:
    """Advances to `step` and shows `postfix` (e.g. loss=2.31, lr=1e-3)."""
    previous, self._step = self._step, step
    if not self._enabled:
      return
    now = time.monotonic()
    if self._clock is None:  # The first step of this start: compiled, not yet timed.
      self._clock = (now, step)
      if self._interactive:
        self._bar = tqdm.tqdm(total=self._total * self._images_per_step,
                              initial=step * self._images_per_step, unit='img', unit_scale=True,
                              dynamic_ncols=True, desc='train', smoothing=0.1)
    elif self._bar is not None:
      self._bar.update((step - previous) * self._images_per_step)
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)
    elif postfix and now - self._last_line >= self._interval_s:
      self._last_line = now
      self.write(self._plain_line(step, now, postfix))

  def _plain_line(self, step: int, now: float, postfix: dict[str, float]) -> str:
    start_time, start_step = self._clock
    text = f'step {step}/{self._total} ({100 * step / self._total:.0f}%)'
    if step > start_step and now > start_time:
      steps_per_s = (step - start_step) / (now - start_time)
      eta = datetime.timedelta(seconds=round((self._total - step) / steps_per_s))
      text += f', {steps_per_s * self._images_per_step:.1f} img/s, ETA {eta}'
    return text + ''.join(f', {k} {v:.4g}' for k, v in postfix.items())

  def write(self, message: str) -> None:
    """Prints a line (above the bar, if there is one)."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(message, file=self._stream)
    else:
      print(message, file=self._stream or sys.stdout, flush=True)

  def close(self) -> None:
    """Finishes the bar."""
    if self._bar is not None:
      self._bar.close()
