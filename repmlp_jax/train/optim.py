"""The optimizer of the official recipe: grad-norm clipping, then AdamW with a weight-decay mask
and a per-step learning-rate schedule (linear warmup, then cosine), as optax transformations.
SGD with momentum and coupled (L2, PyTorch-style) weight decay serves the CIFAR recipes."""

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warmup from warmup_lr to the base lr, then cosine to min_lr, per step.

  timm's CosineLRScheduler(t_in_epochs=False), which the official code uses: the cosine runs over
  the whole run (warmup included), so it starts slightly below the peak after warmup. Every lr
  scales with global_batch_size / lr_reference_batch.

  Args:
    config: base_lr, warmup_lr, min_lr, global_batch_size, lr_reference_batch.
    total_steps: steps of the whole run.
    warmup_steps: steps of linear warmup.
  Returns:
    step -> learning rate (jit-able).
  """
  scale = config.global_batch_size / config.lr_reference_batch
  peak, start, end = config.base_lr * scale, config.warmup_lr * scale, config.min_lr * scale

  def schedule(step):
    # The default float: float32, or float64 under jax_enable_x64 (the schedule is checked
    # against timm's to 1e-12).
    step = jnp.asarray(step, jnp.result_type(float))
    warmup = start + (peak - start) * step / max(warmup_steps, 1)
    progress = jnp.minimum(step, total_steps) / max(total_steps, 1)
    cosine = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warmup, cosine)

  return schedule


def decay_mask(params) -> object:
  """True where weight decay applies: kernels (ndim > 1). BN parameters and biases are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """PyTorch's clip_grad_norm_: gradients times min(1, max_norm / (norm + 1e-6)).

  optax.clip_by_global_norm scales by max_norm / norm; the 1e-6 makes a relative difference of
  about 1e-6 / norm, which Adam carries into every later update. This is the authors' rule, and
  its state is optax's (EmptyState), so checkpoints are unchanged.
  """
  def clip(updates, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)

  return optax.stateless(clip)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """PyTorch's clip_grad_norm_(grad_clip_norm) followed by AdamW (decoupled decay, masked) or SGD.

  Args:
    config: optimizer ('adamw' or 'sgd'), grad_clip_norm (<= 0: no clipping), weight_decay;
      adam_b1, adam_b2, adam_eps for AdamW; sgd_momentum, sgd_nesterov for SGD, whose weight
      decay is added to the gradient (torch.optim.SGD's), on the same mask.
    schedule: the learning rate per step.
  Returns:
    The optax transformation; its state mirrors the parameter tree (FSDP shards it alike).
  """
  name = config.get('optimizer', 'adamw')
  if name == 'adamw':
    update = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                         weight_decay=config.weight_decay, mask=decay_mask)
  elif name == 'sgd':
    update = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=config.sgd_momentum, nesterov=config.sgd_nesterov))
  else:
    raise ValueError(f"Unknown optimizer {name!r}: choose 'adamw' or 'sgd'.")
  if config.grad_clip_norm > 0:
    return optax.chain(clip_by_global_norm(config.grad_clip_norm), update)
  return update
