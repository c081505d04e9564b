"""BatchNorm as PyTorch trains it, optionally with statistics per group of images.

`BatchNorm` holds the variables of flax's `nn.BatchNorm` (params `scale`, `bias`; batch_stats
`mean`, `var`; float32, shape (C,)), so checkpoints, the PyTorch key maps and reparam see no
difference. It differs in training mode only:

- the running variance is updated with the unbiased batch variance (n / (n - 1)), as
  `torch.nn.BatchNorm2d` does (flax uses the biased one); normalization uses the biased one, as
  both do;
- with `num_groups` > 1 the batch is split into that many groups of consecutive images, each
  normalized with its own statistics, as under PyTorch's DistributedDataParallel with plain
  BatchNorm, where each GPU normalizes over its own images (the models take the images per
  group, `bn_group_size`, when called, and give their BatchNorms `num_groups(...)`). The running
  statistics are updated with the mean over the groups of each group's statistics.

Statistics are reduced in at least float32 whatever the compute dtype. Evaluation mode (running
averages) computes exactly what `nn.BatchNorm` computes.

The leading axis of every BatchNorm input must be image-major (all rows of image 0, then of
image 1, ...): every model of the package feeds its BatchNorms that way, also where the leading
axis holds windows or partition rows rather than images.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def num_groups(batch_size: int, group_size: int) -> int:
  """The number of BatchNorm groups of `group_size` images in a batch of `batch_size`.

  Args:
    batch_size: images in the batch that the model is applied to (one forward pass; with
      gradient accumulation, one micro-batch).
    group_size: images per group, consecutive in the batch; 0 = the whole batch (one group).
  Returns:
    batch_size // group_size, or 1 for group_size 0.
  Raises:
    ValueError: group_size is negative or does not divide batch_size.
  """
  if group_size < 0:
    raise ValueError(f'bn_group_size must be >= 0 (0 = the whole batch); got {group_size}.')
  if group_size and batch_size % group_size:
    raise ValueError(f'bn_group_size={group_size} does not divide the batch of {batch_size} '
                     'images that one forward pass sees (global_batch_size, divided by the '
                     'gradient accumulation steps); choose a divisor, or 0 for the whole batch.')
  return batch_size // group_size if group_size else 1


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running variance and optional groups."""
  use_running_average: bool = False
  num_groups: int = 1  # Equal, consecutive slices of the leading axis, normalized separately.
  momentum: float = 0.9  # Of the running averages: PyTorch's momentum 0.1.
  epsilon: float = 1e-5
  dtype: Any = None  # Of the output; None: that of the input.
  # Channels with statistics and affine parameters of their own; None: all of x's. With fewer,
  # x's channel c shares those of c % features (x holds several blocks of `features` channels).
  features: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features or x.shape[-1],)
    blocks = x.shape[-1] // features[0]
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    dtype = self.dtype or x.dtype
    tile = functools.partial(jnp.tile, reps=blocks)  # Per feature -> per channel of x.
    if self.use_running_average:
      return _normalize(x, tile(ra_mean.value), tile(ra_var.value), tile(scale), tile(bias),
                        self.epsilon, dtype)

    groups = self.num_groups
    if x.shape[0] % groups:
      raise ValueError(f'BatchNorm {self.name}: a leading axis of {x.shape[0]} does not split '
                       f'into {groups} groups; its rows must be image-major, whole images per '
                       'group.')
    count = x.size // features[0] // groups  # Values per channel in one group: PyTorch's n.
    if count < 2:
      raise ValueError(f'BatchNorm {self.name} needs more than one value per channel and group '
                       f'in training mode (input {x.shape}, {groups} group(s)); use larger '
                       'groups (bn_group_size) or batches.')
    # Only the leading axis is split: the minor axes keep their layout (on TPU a reshape that
    # merged them would be a copy of the whole map).
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y, mean, var = normalize_batch(grouped, scale.astype(stat_dtype), bias.astype(stat_dtype),
                                   self.epsilon, jnp.dtype(dtype), blocks)
    if not self.is_initializing():
      m = self.momentum
      mean, var = jax.lax.stop_gradient((mean, var))
      unbiased = var * (count / (count - 1))
      ra_mean.value = (m * ra_mean.value + (1 - m) * mean.mean(0)).astype(ra_mean.value.dtype)
      ra_var.value = (m * ra_var.value + (1 - m) * unbiased.mean(0)).astype(ra_var.value.dtype)
    return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any,
                    blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalization of each group with its own statistics.

  Args:
    x: (G, ..., C): G groups (consecutive images), in the compute dtype.
    scale, bias: (C / blocks,) in the statistics' dtype (float32 at least).
    epsilon: added to the variance.
    dtype: of the output y.
    blocks: channel c of x uses feature c % (C / blocks) (1: one feature per channel).
  Returns:
    y (G, ..., C) in `dtype`; each group's mean and biased variance (G, C / blocks).

  The gradient is PyTorch's BatchNorm backward, written out (one pass for the two sums, one for
  the input's gradient): the same formula as the reference the training is compared with, so
  that a float64 step agrees with it to rounding, also in parameters whose exact gradient is 0
  (a bias followed by a BatchNorm), where AdamW turns rounding noise into updates.
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon, dtype, blocks)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon, dtype, blocks):
  mean, var = _statistics(x, blocks)
  y = _normalize(x, _per_group(mean, x, blocks), _per_group(var, x, blocks),
                 jnp.tile(scale, blocks), jnp.tile(bias, blocks), epsilon, dtype)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _normalize_batch_bwd(epsilon, dtype, blocks, residuals, cotangents):
  del epsilon, dtype  # In rstd already; the output's dtype is the cotangent's.
  x, mean, rstd, scale = residuals
  g_y, g_mean, g_var = cotangents
  count = x.size // x.shape[0] // scale.shape[0]  # Values per feature in one group.
  centered = x.astype(scale.dtype) - _per_group(mean, x, blocks)
  x_hat = centered * _per_group(rstd, x, blocks)
  g = g_y.astype(scale.dtype)
  sum_g = _pool(jnp.sum(g, _inner_axes(x)), blocks, jnp.sum)  # (G, C / blocks)
  sum_g_x_hat = _pool(jnp.sum(g * x_hat, _inner_axes(x)), blocks, jnp.sum)
  g_x = _per_group(rstd * scale, x, blocks) * (
      g - (_per_group(sum_g, x, blocks) + x_hat * _per_group(sum_g_x_hat, x, blocks)) / count)
  # The statistics' own cotangents (zero when they feed only the running averages).
  g_x = g_x + (_per_group(g_mean, x, blocks) + 2.0 * _per_group(g_var, x, blocks) * centered
               ) / count
  return g_x.astype(x.dtype), sum_g_x_hat.sum(0), sum_g.sum(0)


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def _statistics(x: jax.Array, blocks: int) -> tuple[jax.Array, jax.Array]:
  """Each group's mean and biased variance (G, C / blocks) of x (G, ..., C), from one pass.

  Accumulated in at least float32 (bfloat16 compute; float64 kept) without a float32 copy of x,
  so that XLA fuses the two sums into x's producer.
  """
  stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
  mean = _pool(jnp.mean(x, _inner_axes(x), dtype=stat_dtype), blocks, jnp.mean)
  mean_sq = _pool(jnp.mean(jnp.square(x.astype(stat_dtype)), _inner_axes(x)), blocks, jnp.mean)
  return mean, jnp.maximum(0.0, mean_sq - mean * mean)


def _per_group(per_feature: jax.Array, x: jax.Array, blocks: int) -> jax.Array:
  """(G, C / blocks) -> broadcastable against x (G, ..., C)."""
  return jnp.tile(per_feature, blocks).reshape(x.shape[0], *(1,) * (x.ndim - 2), x.shape[-1])


def _inner_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


def _pool(per_channel: jax.Array, blocks: int, reduce) -> jax.Array:
  """(G, C) -> (G, C / blocks): channels c and c + k*C/blocks are one feature (equal counts)."""
  if blocks == 1:
    return per_channel
  return reduce(per_channel.reshape(per_channel.shape[0], blocks, -1), axis=1)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """(x - mean) * rsqrt(var + eps) * scale + bias in the statistics' dtype, as nn.BatchNorm."""
  y = x - mean
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return jnp.asarray(y * mul + bias, dtype)
