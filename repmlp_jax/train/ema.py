"""Exponential moving averages of the weights (and BatchNorm statistics), two rules.

- Per-step decay (`config.ema_decay` > 0): after every step, ema = decay * ema + (1 - decay) * new.
- The RepMLPNet authors' rule (`config.ema_alpha` > 0, their TRAIN.EMA_ALPHA): after the steps
  whose index within the epoch is a multiple of `ema_update_period` (their EMA_UPDATE_PERIOD, 8),
  ema = (1 - a) * ema + a * new with a = min(1, ema_alpha * global_batch / epochs * period), and
  a = 1 (a copy) during the warmup epochs. The scaling keeps the averaging horizon, in epochs,
  about the same for any batch size and run length.

Both average everything the model holds: parameters and BatchNorm running statistics. The EMA
starts as a copy of the initial variables.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses contradictory or impossible EMA settings with one clear message."""
  if config.ema_decay > 0 and config.ema_alpha > 0:
    raise ValueError('Set either ema_decay (per-step EMA) or ema_alpha (the authors\' periodic '
                     f'EMA), not both; got ema_decay={config.ema_decay}, '
                     f'ema_alpha={config.ema_alpha}.')
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f'ema_decay must be in [0, 1) (0 = off); got {config.ema_decay}.')
  if config.ema_alpha > 0 and config.ema_update_period < 1:
    raise ValueError(f'ema_update_period must be >= 1; got {config.ema_update_period}.')


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the state holds an EMA."""
  return config.ema_decay > 0 or config.ema_alpha > 0


def new_weight(config: ml_collections.ConfigDict, step: jax.Array, *, steps_per_epoch: int,
               total_steps: int) -> jax.Array:
  """The weight `a` of the new variables after optimizer step `step` (0-based) for the authors'
  rule: their alpha on update steps (1 during warmup), 0 on the others.

  Args:
    config: ema_alpha, ema_update_period, global_batch_size, warmup_epochs.
    step: index of the step just taken (scalar int array).
    steps_per_epoch, total_steps: the run's (derive_steps); epochs = total / per epoch.
  Returns:
    A scalar in [0, 1].
  """
  period = config.ema_update_period
  epochs = total_steps / steps_per_epoch
  adjust = config.global_batch_size / epochs * period  # In the authors' order of operations.
  alpha = min(1.0, config.ema_alpha * adjust)
  epoch, index = step // steps_per_epoch, step % steps_per_epoch
  alpha = jnp.where(epoch < config.warmup_epochs, 1.0, alpha)
  return jnp.where(index % period == 0, alpha, 0.0)


def update(config: ml_collections.ConfigDict, ema: Any, variables: Any, step: jax.Array, *,
           steps_per_epoch: int, total_steps: int) -> Any:
  """The EMA after optimizer step `step`, given the variables that step produced.

  Args:
    config: ema_decay, or ema_alpha and the settings new_weight reads.
    ema: the EMA before the step ({'params', 'batch_stats'}).
    variables: the variables after the step, same structure.
    step: index of the step just taken (0-based).
    steps_per_epoch, total_steps: the run's.
  Returns:
    The new EMA.
  """
  if config.ema_decay > 0:
    decay = config.ema_decay
    return jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, ema, variables)
  a = new_weight(config, step, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  # In the authors' order, e * (1 - a) + x * a: exactly the old EMA when a = 0.
  return jax.tree.map(lambda e, x: (e * (1.0 - a) + x * a).astype(e.dtype), ema, variables)
