"""Training checkpoints: an orbax CheckpointManager in `<workdir>/checkpoints` that keeps the
last checkpoint and the best one (highest eval top-1), restores into sharded abstract targets, and
turns SIGTERM / a preemption notice into a save at the next step boundary.

Every process calls save and restore (orbax writes from the primary host and synchronises the
others). Saves are synchronous. The directory is local or gs:// (`repmlp_jax.storage`): on a pod
every host must see the same checkpoints, so there the workdir is a bucket.
"""

import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.train import sharding as sharding_lib

BEST_METRIC = 'top1'
_ITEM = 'default'  # The folder of a CheckpointManager step that holds the single item.


class Checkpoints:
  """The training state's checkpoints in one directory: last and best kept."""

  def __init__(self, directory: str | os.PathLike, *, best_metric: str = BEST_METRIC):
    """Opens (creating if needed) `directory`.

    Args:
      directory: where step directories `<step>/` are written, local or gs://.
      best_metric: key of the eval metrics whose maximum marks the best checkpoint.
    """
    self.directory = storage.name(directory)
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=1),
        policies.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    # Synchronous saves: the state is donated to the next step, and a save every few thousand
    # steps costs seconds; a finished save() is a complete checkpoint. What a killed save left
    # behind is removed when the next start opens the directory.
    options = ocp.CheckpointManagerOptions(preservation_policy=keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    with storage.reaching(self.directory):
      self._manager = ocp.CheckpointManager(storage.resolve(self.directory), options=options)
    self._failed = False

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def stored_shapes(self, step: int) -> Any:
    """The tree of array metadata (`.shape`, `.dtype`) that checkpoint `step` holds, unread."""
    # The handler reads only the tree's metadata (a Checkpointer would also warn about the step
    # metadata it looks for).
    metadata = ocp.StandardCheckpointHandler().metadata(
        storage.resolve(self.directory) / str(step) / _ITEM)
    return getattr(metadata, 'tree', metadata)

  def set_aside(self, step: int, folder: str) -> str:
    """Moves checkpoint `step` to `<workdir>/<folder>/<step>` (kept, no longer resumed from).

    Returns:
      Where it went.
    """
    directory = storage.resolve(self.directory)
    target = directory.parent / folder / str(step)
    if jax.process_index() == 0:
      storage.make_parents(target)
      if target.exists():
        target = target.parent / f'{step}.{len(list(target.parent.iterdir()))}'
      storage.move(directory / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('repmlp_jax set_aside')
    self._manager.reload()
    return os.fspath(target)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Reads a checkpoint into the shapes, dtypes and shardings of `abstract_state`.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct carrying `sharding`.
      step: which checkpoint; default the latest.
    Returns:
      The state, each array placed as its abstract leaf says.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_part(self, step: int, keys: tuple[str, ...],
                   sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """Reads only the top-level entries `keys` of checkpoint `step` (e.g. the params for an
    export; the optimizer state is left unread), every array placed with `sharding`."""
    stored = self.stored_shapes(step)
    missing = [k for k in keys if k not in stored]
    if missing:
      raise KeyError(missing[0])
    abstract = sharding_lib.placed({k: stored[k] for k in keys}, sharding)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(
          storage.resolve(self.directory) / str(step) / _ITEM, args=ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True))

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Writes `state` as checkpoint `step` (atomically: a temporary directory, then renamed).

    Args:
      step: the number of training steps `state` has taken.
      state: the training state pytree.
      metrics: eval metrics of this state (a checkpoint with metrics can be the best one).
    Raises:
      outputs.WriteError: the disk filled up; one line naming the last good checkpoint, and
        the temporary directory removed.
    """
    last = self.latest_step()
    kept = (f'the last good checkpoint is step {last} in {self.directory}' if last is not None
            else 'no checkpoint had been written yet')
    with outputs.writing(storage.resolve(self.directory) / str(step),
                         kept=kept + '; free space, then rerun the same command to resume'):
      try:
        self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
      except BaseException:
        self._failed = True  # close() must not wait on, or re-raise, the broken save.
        # orbax's background threads may still be writing the step's temporary directory: let
        # them stop before `outputs.writing` removes what the save left.
        try:
          self._manager.wait_until_finished()
        except Exception:  # pylint: disable=broad-except  (the same failure, raised again)
          pass
        raise

  def reached_preemption(self, step: int) -> bool:
    """True on every process when the cluster announced a preemption (multi-process runs)."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    if self._failed:
      return
    self._manager.wait_until_finished()
    self._manager.close()


class StopRequest:
  """Turns SIGTERM / SIGINT into a request to checkpoint and stop at the next step boundary.

  Only in single-process runs: with several processes a signal may reach some of them only, and
  a stop decided by one process alone would hang the others in their next collective. There,
  jax's preemption service (started by jax.distributed.initialize, which also watches SIGTERM)
  synchronises the decision: see Checkpoints.reached_preemption.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._requested = False
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self._requested = True

  @property
  def requested(self) -> bool:
    """Whether a signal asked the run to stop."""
    return self._requested

  def close(self) -> None:
    """Restores the signal handlers that were there before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
