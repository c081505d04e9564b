"""What a training run reports, from process 0 only: a tqdm progress bar (images/s, ETA) and
scalar metrics written both to TensorBoard (tf.summary, `<workdir>/tensorboard`) and to a
JSON-lines file (`<workdir>/metrics.jsonl`, one {"step": ..., name: value, ...} per line).

A resumed run appends to the same files; TensorBoard and the JSON lines may then hold the steps
between the last checkpoint and the interruption twice (the later entries are the kept run's).
"""

import json
import math
import os
from typing import Mapping

import jax
import tqdm


class MetricWriter:
  """Scalars to TensorBoard and to metrics.jsonl; a no-op on processes other than 0."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = self._file = None
    if self.enabled:
      import tensorflow as tf  # The data pipeline's dependency; imported only where used.
      from tensorflow.core.framework import summary_pb2
      os.makedirs(workdir, exist_ok=True)
      self._tf = tf
      # What TensorBoard's scalar plugin reads; written with tf.summary.write so that the
      # tensorboard package is not needed to write (only to view).
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
      self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

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
    with self._writer.as_default(step=step):
      for name, value in values.items():
        self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                               metadata=self._metadata)
    self._writer.flush()
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      self._writer.close()
      self._file.close()
      self.enabled = False


class ProgressBar:
  """A tqdm bar counting images, hence images/s and the ETA; process 0 only."""

  def __init__(self, *, total_steps: int, start_step: int, images_per_step: int,
               enabled: bool | None = None):
    enabled = jax.process_index() == 0 if enabled is None else enabled
    self._images_per_step = images_per_step
    self._step = start_step
    self._bar = tqdm.tqdm(total=total_steps * images_per_step, initial=start_step * images_per_step,
                          unit='img', unit_scale=True, dynamic_ncols=True, disable=not enabled,
                          desc='train', smoothing=0.1)

  def update(self, step: int, **postfix: float) -> None:
    """Advances the bar to `step` and shows `postfix` (e.g. loss=2.31, lr=1e-3)."""
    self._bar.update((step - self._step) * self._images_per_step)
    self._step = step
    if postfix:
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def write(self, message: str) -> None:
    """Prints a line above the bar."""
    if not self._bar.disable:
      self._bar.write(message)

  def close(self) -> None:
    """Finishes the bar."""
    self._bar.close()
