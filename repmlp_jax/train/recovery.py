"""Resuming a workdir after its accidents: a damaged checkpoint, or a config that changed.

`restore_newest_readable` picks the checkpoint to resume from. Before reading one it compares the
array names and shapes stored with those the current config builds: if they differ, the workdir
belongs to another model or state layout, and the error names the config fields that differ
(the workdir's config.json against the new config). Settings that do not change the state's
layout (epochs, eval / checkpoint / log intervals, data_dir, learning rates) may change between
starts. A checkpoint that has the right layout but cannot be read (a truncated file after a bad
copy or a failing disk) is moved to `<workdir>/damaged_checkpoints/<step>`, never deleted, and the
next newest one is used, with one warning line; when none is readable the error says so.
"""

import json
import os
from typing import Any, Callable

from flax import traverse_util
import jax
import ml_collections

from repmlp_jax import storage
from repmlp_jax.train import checkpointing

DAMAGED_DIR = 'damaged_checkpoints'
# Fields that change how long or how often, not what is trained: listed after the others when
# a workdir's config differs, as the least likely cause of a different state layout.
RESUMABLE_FIELDS = ('num_epochs', 'num_train_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                    'log_every_steps', 'data_dir', 'eval_batch_size', 'init_from', 'tensorboard')
_SHOWN = 3


class IncompatibleWorkdirError(ValueError):
  """The workdir's checkpoints hold another model or state layout than the config builds."""


class NoReadableCheckpointError(ValueError):
  """Every checkpoint of the workdir is damaged."""


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
          for path, leaf in leaves}


def config_differences(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for every field where the workdir's config.json and `config` differ.

  Args:
    workdir: the run's directory, local or gs:// (config.json is the config of its latest
      start).
    config: the config of this start.
  Returns:
    The differences, layout-relevant fields first; empty if there is no config.json.
  """
  path = storage.resolve(workdir) / 'config.json'
  if not path.is_file():
    return []
  old = traverse_util.flatten_dict(json.loads(path.read_text(encoding='utf-8')), sep='.')
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  changed = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k)),
                   key=lambda k: (k in RESUMABLE_FIELDS, k))
  return [f'{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}' for k in changed]


def _layout_error(checkpoints: checkpointing.Checkpoints, step: int,
                  stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  config: ml_collections.ConfigDict) -> IncompatibleWorkdirError:
  workdir = os.fspath(storage.resolve(checkpoints.directory).parent)
  differences = config_differences(workdir, config)
  if differences:
    what = 'the config differs from the one that wrote them: ' + '; '.join(differences[:_SHOWN])
    if len(differences) > _SHOWN:
      what += f'; ... ({len(differences) - _SHOWN} more)'
  else:
    key = next(k for k in sorted(stored.keys() | expected.keys())
               if stored.get(k) != expected.get(k))
    what = f'{key} is stored as {stored.get(key)}, the config builds {expected.get(key)}'
  return IncompatibleWorkdirError(
      f'{workdir} holds checkpoints (step {step}) of another model or state layout ({what}); '
      'use another --workdir, or the config that wrote them (its config.json).')


def restore_newest_readable(checkpoints: checkpointing.Checkpoints, abstract_state: Any,
                            config: ml_collections.ConfigDict,
                            warn: Callable[[str], None]) -> Any | None:
  """The newest checkpoint that fits `abstract_state` and reads completely, or None if none.

  Args:
    checkpoints: the workdir's checkpoints.
    abstract_state: the state the config builds (shapes, dtypes, shardings).
    config: the config of this start (named in the error when the layout differs).
    warn: prints the one warning line when damaged checkpoints were set aside.
  Returns:
    The restored state, or None when the workdir has no checkpoint yet.
  Raises:
    IncompatibleWorkdirError: the checkpoints hold another model or state layout.
    NoReadableCheckpointError: there are checkpoints, and none of them can be read.
  """
  expected = _flat(abstract_state)
  damaged = []
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      stored = _flat(checkpoints.stored_shapes(step))
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: a damaged step)
      stored = None
    if stored is not None and stored != expected:
      raise _layout_error(checkpoints, step, stored, expected, config)
    try:
      state = checkpoints.restore(abstract_state, step) if stored is not None else None
    except Exception:  # pylint: disable=broad-except  tensorstore raises plain Exception.
      state = None
    if state is None:
      damaged.append(step)
      continue
    if damaged:
      moved = [checkpoints.set_aside(s, DAMAGED_DIR) for s in damaged]
      warn(f'Warning: checkpoint step {", ".join(map(str, damaged))} cannot be read (moved to '
           f'{os.path.dirname(moved[0])}); resuming from step {step}.')
    return state
  if damaged:
    raise NoReadableCheckpointError(
        f'No checkpoint in {checkpoints.directory} can be read (steps '
        f'{", ".join(map(str, damaged))} are damaged); restore them from a copy, or move '
        'them away to start this run from scratch.')
  return None
