"""The model of a train.py run: its config.json's model with the weights of one checkpoint.

A workdir (`<workdir>`, `<workdir>/checkpoints` or `<workdir>/checkpoints/<step>`) is read like any
training-form checkpoint: the model's settings come from the run's config.json, its number of
classes from the stored classifier, and its variables are the checkpoint's params and BatchNorm
statistics, or those of its EMA. Only those are read (not the optimizer state).
"""

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from repmlp_jax import families
from repmlp_jax import storage

CONFIG_NAME = 'config.json'
CHECKPOINTS = 'checkpoints'


class Found(NamedTuple):
  """Where a run's pieces are."""
  workdir: str
  step: int | None  # The checkpoint named by the path itself, if it names one.


def find(path: str | os.PathLike) -> Found | None:
  """The run `path` belongs to (a workdir, its checkpoints folder or one step), or None."""
  path = storage.resolve(path)
  parent, name = path.parent, path.name
  candidates = [(path, None), (parent, None) if name == CHECKPOINTS else None,
                (parent.parent, int(name))
                if name.isdigit() and parent.name == CHECKPOINTS else None]
  for workdir, step in filter(None, candidates):
    if (workdir / CHECKPOINTS).is_dir() and (workdir / CONFIG_NAME).is_file():
      return Found(os.fspath(workdir), step)
  return None


def _config(workdir: str) -> ml_collections.ConfigDict:
  path = storage.resolve(workdir) / CONFIG_NAME
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding='utf-8')))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not the JSON train.py writes ({e}).') from None


def _steps(directory: str) -> list[int]:
  # orbax renames a step's temporary folder to the bare number once it is complete.
  return sorted(int(p.name) for p in storage.resolve(directory).iterdir() if p.name.isdigit())


def read(path: str | os.PathLike, *, step: int | None = None, use_ema: bool = False,
         sharding: jax.sharding.Sharding | None = None) -> Any:
  """Reads the training-form model of a run's checkpoint.

  Args:
    path: the workdir, its checkpoints folder, or one `checkpoints/<step>` folder.
    step: which checkpoint (default: the one `path` names, else the latest).
    use_ema: the EMA weights instead of the trained ones.
    sharding: where to place every array (default: the first device).
  Returns:
    (model, variables, lines saying what was read).
  Raises:
    ValueError: no such step, no checkpoint yet, or no EMA weights in the run.
  """
  # Imported here: the experiment brings the optimizer, which readers of other formats skip.
  from repmlp_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import experiment  # pylint: disable=g-import-not-at-top
  found = find(path)
  if found is None:
    raise ValueError(f'{path} is not a train.py workdir or one of its checkpoints.')
  directory = os.fspath(storage.resolve(found.workdir) / CHECKPOINTS)
  available = _steps(directory)
  if found.step is not None and step is not None and step != found.step:
    raise ValueError(f'{path} is checkpoint {found.step}; the step asked for is {step}.')
  step = found.step if step is None else step
  if not available:
    raise ValueError(f'{directory} holds no checkpoint yet: the run has not saved one.')
  if step is None:
    step = available[-1]
  if step not in available:
    raise ValueError(f'{directory} has no checkpoint {step}; it has step '
                     f'{", ".join(map(str, available))}.')
  config = _config(found.workdir)
  checkpoints = checkpointing.Checkpoints(directory)
  try:
    stored = checkpoints.stored_shapes(step)
    if use_ema and 'ema' not in stored:
      raise ValueError(f'Checkpoint {step} in {directory} holds no EMA weights (the run had '
                       'ema_decay = ema_alpha = 0); drop --ema / use_ema.')
    # The number of classes is the stored classifier's (a data set's, not the config's).
    classifier = families.of(experiment.build_model(config, 1)).classifier
    model = experiment.build_model(config, stored['params'][classifier]['kernel'].shape[-1])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if use_ema:
      variables = checkpoints.restore_part(step, ('ema',), sharding)['ema']
    else:
      variables = checkpoints.restore_part(step, ('params', 'batch_stats'), sharding)
  finally:
    checkpoints.close()
  weights = 'EMA weights' if use_ema else 'weights'
  lines = [f'read training form: {found.workdir}, checkpoint {step} of '
           f'{", ".join(map(str, available))} ({weights}; model from its {CONFIG_NAME})']
  return model, dict(variables), lines
