"""The training loop: `train_and_evaluate(config, workdir)`, what train.py runs.

Layout of a workdir:
  checkpoints/<step>/   the last and the best (eval top-1) training states (orbax)
  deploy/               the final model in deploy form (repmlp_jax.model_io.load_model)
  metrics.jsonl         train and eval scalars, one JSON object per logged step
  tensorboard/          the same scalars for TensorBoard
  config.json           the config of the latest start
  damaged_checkpoints/  checkpoints that could not be read, set aside on resuming (recovery.py)

Rerunning the same command resumes from the last checkpoint and continues exactly as an
uninterrupted run would: the state holds the step and the rng (each step folds the step into
it) and the input pipeline restarts at that step. SIGTERM / SIGINT (single process) or a
preemption notice (multi-process) saves a checkpoint at the next step boundary and stops.
A non-finite loss stops the run with FloatingPointError; every save is preceded by a check of
all steps since the previous one, so the last checkpoint is always a finite state.
"""

import dataclasses
import math
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from repmlp_jax import families
from repmlp_jax.train import checkpointing
from repmlp_jax.data import input_pipeline
from repmlp_jax import model_io
from repmlp_jax import outputs
from repmlp_jax.train import sharding
from repmlp_jax.pytorch import mapping as state_dict_mapping
from repmlp_jax.train import experiment as steps_lib
from repmlp_jax.train import metric_writers as train_logging
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
  if not os.path.isdir(data_dir):
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


def _eval_batches(config, batch_sharding) -> Iterator[dict[str, jax.Array]]:
  local = input_pipeline.create_split(
      config.dataset, train=False,
      batch_size=_local_batch_size(config.eval_batch_size, 'eval_batch_size'),
      image_size=config.eval_image_size, data_dir=config.data_dir,
      preprocess=_preprocess(config))
  return (sharding.global_batch(b, batch_sharding) for b in local)


def _preprocess(config):
  overrides = config.preprocess_overrides.to_dict()
  if not overrides:
    return None  # The data set's default recipe.
  return dataclasses.replace(input_pipeline.default_preprocess(config.dataset), **overrides)


def load_pretrained(exp: steps_lib.Experiment, state: dict[str, Any], path: str) -> dict[str, Any]:
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
  loaded = {c: dict(_flatten(variables[c])) for c in ('params', 'batch_stats')}
  new = {c: dict(_flatten(state[c])) for c in ('params', 'batch_stats')}
  classifier = families.of(exp.model).classifier + '/'
  for collection in new:
    for key in [k for k in new[collection] if k.startswith(classifier)]:
      if key in loaded[collection] and loaded[collection][key].shape != new[collection][key].shape:
        loaded[collection][key] = new[collection][key]  # New classifier size: fresh head.
    state_dict_mapping.check_keys(
        f'{exp.config.model} ({collection} of {path})',
        {k: v.shape for k, v in new[collection].items()},
        {k: v.shape for k, v in loaded[collection].items()})
  result = dict(state)
  for collection in new:
    tree = _unflatten(loaded[collection])
    result[collection] = jax.device_put(tree, exp.state_sharding[collection])
  if 'ema' in state:
    result['ema'] = {c: jax.device_put(result[c], exp.state_sharding['ema'][c])
                     for c in ('params', 'batch_stats')}
  return result


def _flatten(tree: Any, prefix: str = ''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f'{prefix}{key}/')
    else:
      yield f'{prefix}{key}', value


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


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
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and writes the deploy checkpoint; resumes from `workdir` if it can.

  Args:
    config: an experiment config (configs/common.py documents every field).
    workdir: where checkpoints, logs and the deploy model go (see the module docstring).
  Returns:
    The last evaluation's metrics ('top1', 'top5', 'deploy_top1', ...) with 'step', or, when
    stopped by a signal / preemption, {'step': ..., 'preempted': True}.
  """
  workdir = outputs.check_workdir(workdir)  # Before any data is read or anything compiles.
  if config.get('compile_topology'):  # Compile for a TPU target and stop; reads no data.
    return compile_report.compile_for_topology(config, workdir)
  _check_data_dir(config)
  info = input_pipeline.dataset_info(config.dataset, data_dir=config.data_dir)
  steps = steps_lib.derive_steps(config, info.num_train_examples)
  exp = steps_lib.Experiment.cached(config, num_classes=info.num_classes, steps=steps)

  checkpoints = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'))
  writer = train_logging.MetricWriter(workdir)
  stop = checkpointing.StopRequest()
  profiler = profiling.StepProfiler(config.get('profile_steps'), workdir)
  bar = None
  try:
    state = recovery.restore_newest_readable(checkpoints, exp.abstract_state, config,
                                             warn=_print_once)
    _write_config(config, workdir)  # After the check against the config that wrote the workdir.
    if state is None:
      state = exp.init_state()
      if config.init_from:
        state = load_pretrained(exp, state, config.init_from)
    start = int(jax.device_get(state['step']))
    bar = train_logging.ProgressBar(total_steps=steps.total, start_step=start,
                                    images_per_step=config.global_batch_size)
    if start:
      bar.write(f'Resumed from {checkpoints.directory} at step {start}.')
    train_iter = _train_batches(config, start) if start < steps.total else iter(())
    eval_metrics, pending, step = None, [], start
    while step < steps.total:
      batch = sharding.global_batch(next(train_iter), exp.batch_sharding)
      profiler.before_step(step + 1)
      state, measurements = exp.train_step(state, batch)
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
        eval_metrics = exp.evaluate(state, _eval_batches(config, exp.batch_sharding))
        writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
        bar.write(_summary(step, eval_metrics))
      if save:
        checkpoints.save(step, state, metrics=eval_metrics)
      if stopping and step < steps.total:
        bar.write(f'Stopped at step {step} on request; checkpoint saved in '
                  f'{checkpoints.directory}. Rerun the same command to resume.')
        return {'step': step, 'preempted': True}

    if eval_metrics is None:  # Resumed after the last step: evaluate what was restored.
      eval_metrics = exp.evaluate(state, _eval_batches(config, exp.batch_sharding))
      bar.write(_summary(step, eval_metrics))
    deploy_dir = os.path.join(workdir, 'deploy')
    # Decided by process 0 for all: save_model is collective, every process must join it.
    exists = multihost_utils.broadcast_one_to_all(np.asarray(os.path.exists(deploy_dir)))
    if not exists:
      kept = (f'the trained state is kept in {checkpoints.directory} (step {step}); free space, '
              'then rerun the same command to write it')
      with outputs.writing(deploy_dir, kept=kept):
        model_io.save_model(deploy_dir, exp.deploy_model,
                            exp.reparam({'params': state['params'],
                                         'batch_stats': state['batch_stats']}))
    return {'step': step, **eval_metrics}
  finally:
    profiler.close()
    stop.close()
    if bar is not None:
      bar.close()
    checkpoints.close()
    writer.close()


def _print_once(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _summary(step: int, m: dict[str, float]) -> str:
  text = (f'step {step}: eval top-1 {100 * m["top1"]:.2f}% top-5 {100 * m["top5"]:.2f}% | deploy '
          f'top-1 {100 * m["deploy_top1"]:.2f}% top-5 {100 * m["deploy_top5"]:.2f}%')
  if 'ema_top1' in m:
    text += f' | EMA top-1 {100 * m["ema_top1"]:.2f}%'
  return text + f' ({int(m["count"])} images)'
