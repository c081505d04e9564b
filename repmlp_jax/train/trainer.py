"""The training loop: `train_and_evaluate(config, workdir)`, what train.py runs.

Layout of a workdir:
  checkpoints/<step>/   the last and the best (eval top-1) training states (orbax)
  deploy/               the final model in deploy form (repmlp_jax.model_io.load_model)
  metrics.jsonl         train and eval scalars, one JSON object per logged step
  tensorboard/          the same scalars for TensorBoard
  config.json           the config of the latest start
  damaged_checkpoints/  checkpoints that could not be read, set aside on resuming (recovery.py)
The workdir may be a gs:// URL (repmlp_jax.storage): on a pod, where every host must see it.

Rerunning the same command resumes from the last checkpoint and continues exactly as an
uninterrupted run would: the state holds the step and the rng (each step folds the step into
it) and the input pipeline restarts at that step. SIGTERM / SIGINT (single process) or a
preemption notice (multi-process) saves a checkpoint at the next step boundary and stops.
A non-finite loss stops the run with FloatingPointError; every save is preceded by a check of
all steps since the previous one, so the last checkpoint is always a finite state. A start that
fails before its first step (no data, a bad init_from) leaves the workdir as it found it.
A finished run ends with one line: its final accuracies and where the deploy model and the
metrics are.
"""

import dataclasses
import math
import os
import shutil
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from repmlp_jax import families
from repmlp_jax.train import checkpointing
from repmlp_jax.data import input_pipeline
from repmlp_jax import model_io
from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.train import sharding
from repmlp_jax.pytorch import mapping
from repmlp_jax.train import experiment
from repmlp_jax.train import metric_writers
from repmlp_jax.train import profiling
from repmlp_jax.train import recovery
from repmlp_jax.tpu import compile_report

# Errors whose message says all a user needs (what is wrong, what to do): train.py prints them as
# one line instead of a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)

_DATASETS_WITH_DIR = ('image_folder',)  # Data sets that cannot do without config.data_dir.


def _check_data_dir(config: ml_collections.ConfigDict) -> None:
  data_dir = config.data_dir
  if data_dir is None:
    if config.dataset in _DATASETS_WITH_DIR:
      raise ValueError(f'dataset={config.dataset!r} needs --config.data_dir=<root with '
                       'train/<class>/* and val/<class>/*>.')
    return
  with storage.reaching(data_dir):
    found = storage.resolve(data_dir).is_dir()
  if not found:
    raise FileNotFoundError(
        f'config.data_dir={data_dir!r} does not exist. For tfds data sets pass the directory '
        f'that holds the prepared data (e.g. the --data_dir of `tfds build {config.dataset}`); '
        'for image_folder the root holding train/ and val/. See train.py for ImageNet.')


def _local_batch_size(global_batch_size: int, what: str) -> int:
  if global_batch_size % jax.device_count():
    raise ValueError(f'{what}={global_batch_size} must be a multiple of the {jax.device_count()} '
                     'devices (each gets an equal share).')
  return global_batch_size // jax.process_count()


def _train_batches(config, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  return input_pipeline.create_split(
      config.dataset, train=True,
      batch_size=_local_batch_size(config.global_batch_size, 'global_batch_size'),
      image_size=config.image_size, data_dir=config.data_dir, seed=config.seed,
      start_step=start_step, preprocess=_preprocess(config), shuffle_buffer=config.shuffle_buffer,
      data_service_address=config.get('data_service_address'))


def _eval_batches(config, exp: experiment.Experiment) -> Iterator[dict[str, jax.Array]]:
  local = input_pipeline.create_split(
      config.dataset, train=False,
      batch_size=_local_batch_size(config.eval_batch_size, 'eval_batch_size'),
      image_size=config.eval_image_size, data_dir=config.data_dir,
      preprocess=_preprocess(config), image_dtype=exp.eval_image_dtype)
  return (sharding.global_batch(b, exp.batch_sharding) for b in local)


def _preprocess(config):
  overrides = config.preprocess_overrides.to_dict()
  if not overrides:
    return None  # The data set's default recipe.
  return dataclasses.replace(input_pipeline.default_preprocess(config.dataset), **overrides)


def load_pretrained(exp: experiment.Experiment, state: dict[str, Any], path: str) -> dict[str, Any]:
  """Replaces the params and BN statistics of a fresh `state` by those of a saved model.

  The classifier (the family's, `repmlp_jax.families`: `head` or `linear`) is kept freshly
  initialised when its size differs (a new data set); every other variable must match by name
  and shape. The optimizer state stays fresh.

  Args:
    exp: the run's Experiment.
    state: a state from exp.init_state().
    path: a directory written by repmlp_jax.model_io.save_model (training form).
  Returns:
    The state with the loaded variables, sharded as before.
  """
  source_model, variables = model_io.load_model(path, sharding=sharding.replicated(exp.mesh))
  if source_model.deploy:
    raise ValueError(f'{path} holds a deploy-form model, which cannot be trained; convert or save '
                     'the training form (the official training-time weights).')
  loaded = {c: traverse_util.flatten_dict(variables[c], sep='/')
            for c in ('params', 'batch_stats')}
  new = {c: traverse_util.flatten_dict(state[c], sep='/') for c in ('params', 'batch_stats')}
  classifier = families.of(exp.model).classifier + '/'
  for collection in new:
    for key in [k for k in new[collection] if k.startswith(classifier)]:
      if key in loaded[collection] and loaded[collection][key].shape != new[collection][key].shape:
        loaded[collection][key] = new[collection][key]  # New classifier size: fresh head.
    mapping.check_keys(
        f'{exp.config.model} ({collection} of {path})',
        {k: v.shape for k, v in new[collection].items()},
        {k: v.shape for k, v in loaded[collection].items()})
  result = dict(state)
  for collection in new:
    tree = traverse_util.unflatten_dict(loaded[collection], sep='/')
    result[collection] = jax.device_put(tree, exp.state_sharding[collection])
  if 'ema' in state:
    result['ema'] = {c: jax.device_put(result[c], exp.state_sharding['ema'][c])
                     for c in ('params', 'batch_stats')}
  return result


def _pull_and_check(pending: list[dict[str, jax.Array]], first_step: int,
                    checkpoints: checkpointing.Checkpoints) -> dict[str, float]:
  """Brings the measurements of the pending steps to the host; raises on a non-finite loss."""
  values = jax.device_get(pending)
  for i, m in enumerate(values):
    bad = [k for k in ('loss', 'grad_norm') if not math.isfinite(float(m[k]))]
    if bad:
      last = checkpoints.latest_step()
      kept = (f'The last good checkpoint (step {last}) is kept in {checkpoints.directory}'
              if last is not None else 'No checkpoint had been written yet')
      raise FloatingPointError(
          f'{bad[0]} became {float(m[bad[0]])} at step {first_step + i + 1}; training stopped '
          f'and this state was not saved. {kept}. Lower the learning rate (--config.base_lr) '
          'or check the data, then rerun the same command to resume from that checkpoint.')
  return {f'train/{k}': float(np.mean([m[k] for m in values])) for k in values[0]}


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    (storage.resolve(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2, sort_keys=True) + '\n', encoding='utf-8')


def build_experiment(config: ml_collections.ConfigDict) -> experiment.Experiment:
  """The Experiment train_and_evaluate runs for `config` (its data set's classes and steps)."""
  _check_data_dir(config)
  info = input_pipeline.dataset_info(config.dataset, data_dir=config.data_dir)
  return experiment.Experiment(config, num_classes=info.num_classes,
                               steps=experiment.derive_steps(config, info.num_train_examples))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       exp: experiment.Experiment | None = None) -> dict[str, Any]:
  """Trains, evaluates and writes the deploy checkpoint; resumes from `workdir` if it can.

  Args:
    config: an experiment config (configs/common.py documents every field).
    workdir: where checkpoints, logs and the deploy model go (see the module docstring).
    exp: `build_experiment(config)`, kept by a caller that runs the same config more than once
      in one process (a notebook, restarts), whose compiled functions it then reuses.
  Returns:
    The last evaluation's metrics ('top1', 'top5', 'deploy_top1', ...) with 'step', or, when
    stopped by a signal / preemption, {'step': ..., 'preempted': True}.
  """
  before = _WorkdirSnapshot(workdir)
  workdir = outputs.check_workdir(workdir)  # Before any data is read or anything compiles.
  if config.get('compile_topology'):  # Compile for a TPU target and stop; reads no data.
    return compile_report.compile_for_topology(config, workdir)
  checkpoints = writer = stop = profiler = bar = finished = None
  started = False  # Whether a step ran (or the run was complete): then nothing is undone.
  try:
    if exp is None:
      exp = build_experiment(config)
    elif not exp.built_from(config):
      raise ValueError('The Experiment passed was built from another config; pass '
                       'build_experiment(config) of this config, or none.')
    steps = exp.steps

    checkpoints = checkpointing.Checkpoints(storage.resolve(workdir) / 'checkpoints')
    writer = metric_writers.MetricWriter(workdir, tensorboard=config.get('tensorboard', True))
    stop = checkpointing.StopRequest()
    profiler = profiling.StepProfiler(config.get('profile_steps'), workdir)
    state = recovery.restore_newest_readable(checkpoints, exp.abstract_state, config,
                                             warn=_print_once)
    _write_config(config, workdir)  # After the check against the config that wrote the workdir.
    if state is None:
      state = exp.init_state()
      if config.init_from:
        state = load_pretrained(exp, state, config.init_from)
    start = int(jax.device_get(state['step']))
    bar = metric_writers.ProgressBar(total_steps=steps.total, start_step=start,
                                    images_per_step=config.global_batch_size)
    if start:
      bar.write(f'Resumed from {checkpoints.directory} at step {start}.')
    train_iter = _train_batches(config, start) if start < steps.total else iter(())
    eval_metrics, pending, step = None, [], start
    while step < steps.total:
      batch = sharding.global_batch(next(train_iter), exp.batch_sharding)
      profiler.before_step(step + 1)
      state, measurements = exp.train_step(state, batch)
      started = True
      pending.append(measurements)
      step += 1
      profiler.after_step(step, (state, measurements))
      evaluate = step % steps.eval_every == 0 or step == steps.total
      stopping = stop.requested or checkpoints.reached_preemption(step)
      save = evaluate or stopping or step % steps.checkpoint_every == 0
      if save or step % steps.log_every == 0:
        train_metrics = _pull_and_check(pending, step - len(pending), checkpoints)
        pending = []
        writer.write(step, train_metrics)
        bar.update(step, loss=train_metrics['train/loss'], lr=train_metrics['train/lr'])
      else:
        bar.update(step)
      eval_metrics = None
      if evaluate:
        eval_metrics = exp.evaluate(state, _eval_batches(config, exp))
        writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
        bar.write(_summary(step, eval_metrics))
      if save:
        checkpoints.save(step, state, metrics=eval_metrics)
      if stopping and step < steps.total:
        bar.write(f'Stopped at step {step} on request; checkpoint saved in '
                  f'{checkpoints.directory}. Rerun the same command to resume.')
        return {'step': step, 'preempted': True}

    started = True
    if eval_metrics is None:  # Resumed after the last step: evaluate what was restored.
      eval_metrics = exp.evaluate(state, _eval_batches(config, exp))
      bar.write(_summary(step, eval_metrics))
    deploy_dir = os.fspath(storage.resolve(workdir) / 'deploy')
    # Decided by process 0 for all: save_model is collective, every process must join it.
    exists = multihost_utils.broadcast_one_to_all(
        np.asarray(storage.resolve(deploy_dir).exists()))
    if not exists:
      kept = (f'the trained state is kept in {checkpoints.directory} (step {step}); free space, '
              'then rerun the same command to write it')
      with outputs.writing(deploy_dir, kept=kept):
        model_io.save_model(deploy_dir, exp.deploy_model,
                            exp.reparam({'params': state['params'],
                                         'batch_stats': state['batch_stats']}))
    finished = _finished(step, eval_metrics, workdir)
    return {'step': step, **eval_metrics}
  finally:
    for resource in (profiler, stop, bar, checkpoints, writer):
      if resource is not None:
        resource.close()
    if not started:
      before.restore()
    if finished:
      _print_once(finished)  # After the progress bar is gone: the last line of the run.


class _WorkdirSnapshot:
  """What a local workdir held before a start, to undo a start that fails before its first step.

  A bucket workdir is left as it is: a failed start writes at most its config.json there.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.remote = storage.is_remote(workdir)
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.existed = self.remote or os.path.isdir(self.workdir)
    self.paths = set()
    self.config = None
    if self.existed:
      self.paths = {os.path.join(root, name) for root, dirs, files in os.walk(self.workdir)
                    for name in dirs + files}
      config = os.path.join(self.workdir, 'config.json')
      if os.path.isfile(config):
        with open(config, 'rb') as f:
          self.config = f.read()

  def restore(self) -> None:
    """Removes what appeared since (never checkpoints set aside as damaged) and the workdir
    itself if it was created; puts the previous config.json back."""
    if jax.process_index() != 0 or self.remote or not os.path.isdir(self.workdir):
      return
    kept = os.path.join(self.workdir, recovery.DAMAGED_DIR)
    for root, dirs, files in os.walk(self.workdir, topdown=False):
      for name in files + dirs:
        path = os.path.join(root, name)
        if path not in self.paths and not (path + os.sep).startswith(kept + os.sep):
          if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
          else:
            os.unlink(path)
    if self.config is not None:
      with open(os.path.join(self.workdir, 'config.json'), 'wb') as f:
        f.write(self.config)
    if not self.existed and not os.listdir(self.workdir):
      os.rmdir(self.workdir)


def _print_once(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _finished(step: int, m: dict[str, float], workdir: str) -> str:
  """The run's last line: done, the final accuracies of both forms, where the results are."""
  text = (f'Finished at step {step}: eval top-1 {100 * m["top1"]:.2f}% (training form), '
          f'{100 * m["deploy_top1"]:.2f}% (deploy form)')
  if 'ema_top1' in m:
    text += f', {100 * m["ema_top1"]:.2f}% (EMA)'
  return (text + f'; deploy model in {os.path.join(workdir, "deploy")}, metrics in '
          f'{os.path.join(workdir, "metrics.jsonl")}.')


def _summary(step: int, m: dict[str, float]) -> str:
  text = (f'step {step}: eval top-1 {100 * m["top1"]:.2f}% top-5 {100 * m["top5"]:.2f}% | deploy '
          f'top-1 {100 * m["deploy_top1"]:.2f}% top-5 {100 * m["deploy_top5"]:.2f}%')
  if 'ema_top1' in m:
    text += f' | EMA top-1 {100 * m["ema_top1"]:.2f}%'
  return text + f' ({int(m["count"])} images)'
