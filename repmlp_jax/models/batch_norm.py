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
axis holds windows or partition rows rather than images. The channels are the last axis, or the
last `channel_axes` axes together (a map whose C channels are held as (C / S, S)).
"""

import functools
import math
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
  """BatchNorm over all axes but the channels, with PyTorch's running variance and optional
  groups."""
  use_running_average: bool = False
  num_groups: int = 1  # Equal, consecutive slices of the leading axis, normalized separately.
  momentum: float = 0.9  # Of the running averages: PyTorch's momentum 0.1.
  epsilon: float = 1e-5
  dtype: Any = None  # Of the output; None: that of the input.
  # x's trailing axes that index the channels together, row-major; the variables stay (C,).
  channel_axes: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channel_shape = x.shape[x.ndim - self.channel_axes:]
    features = (math.prod(channel_shape),)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32).reshape(channel_shape)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32).reshape(channel_shape)
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      return _normalize(x, ra_mean.value.reshape(channel_shape),
                        ra_var.value.reshape(channel_shape), scale, bias, self.epsilon, dtype)

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
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y, mean, var = normalize_batch(x, scale.astype(stat_dtype), bias.astype(stat_dtype),
                                   self.epsilon, jnp.dtype(dtype), groups)
    if not self.is_initializing():
      m = self.momentum
      mean, var = jax.lax.stop_gradient((mean.reshape(groups, -1), var.reshape(groups, -1)))
      unbiased = var * (count / (count - 1))
      ra_mean.value = (m * ra_mean.value + (1 - m) * mean.mean(0)).astype(ra_mean.value.dtype)
      ra_var.value = (m * ra_var.value + (1 - m) * unbiased.mean(0)).astype(ra_var.value.dtype)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any,
                    groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalization of each group with its own statistics.

  Args:
    x: (L, ..., *F) in the compute dtype; L rows (images, or image-major windows) in `groups`
      groups of consecutive rows; the channels are the trailing axes F, scale's shape.
    scale, bias: (*F) in the statistics' dtype (float32 at least).
    epsilon: added to the variance.
    dtype: of the output y.
    groups: equal groups of consecutive rows, each normalized with its own statistics.
  Returns:
    y like x in `dtype`; each group's mean and biased variance (groups, *F).

  Every sum is taken per row first and then over the rows of a group: x itself is never
  reshaped (on TPU, splitting the leading axis of a map laid out with the images minor pads each
  group's images up to 128 lanes and copies the whole map).

  The gradient is PyTorch's BatchNorm backward, written out (one pass for the two sums, one for
  the input's gradient): the same formula as the reference the training is compared with, so
  that a float64 step agrees with it to rounding, also in parameters whose exact gradient is 0
  (a bias followed by a BatchNorm), where AdamW turns rounding noise into updates.
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon, dtype, groups)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon, dtype, groups):
  stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
  inner = _inner_axes(x, scale)
  count = x.size // scale.size // groups  # Values per channel in one group.
  mean = _group_sum(jnp.sum(x, inner, dtype=stat_dtype), groups) / count
  mean_sq = _group_sum(jnp.sum(jnp.square(x.astype(stat_dtype)), inner), groups) / count
  var = jnp.maximum(0.0, mean_sq - mean * mean)
  y = _normalize(x, _per_row(mean, x), _per_row(var, x), scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _normalize_batch_bwd(epsilon, dtype, groups, residuals, cotangents):
  del epsilon, dtype  # In rstd already; the output's dtype is the cotangent's.
  x, mean, rstd, scale = residuals
  g_y, g_mean, g_var = cotangents
  inner = _inner_axes(x, scale)
  count = x.size // scale.size // groups
  centered = x.astype(scale.dtype) - _per_row(mean, x)
  g = g_y.astype(scale.dtype)
  # PyTorch's names and order: dotp = sum((x - mean) * dy), k = dotp * invstd^2 / n,
  # dx = (dy - sum(dy) / n - (x - mean) * k) * invstd * weight.
  sum_g = _group_sum(jnp.sum(g, inner), groups)  # (groups, *F)
  dotp = _group_sum(jnp.sum(g * centered, inner), groups)
  k = dotp * rstd * rstd / count
  g_x = (g - _per_row(sum_g / count, x) - centered * _per_row(k, x)) * _per_row(rstd * scale, x)
  # The statistics' own cotangents (zero when they feed only the running averages).
  g_x = g_x + (_per_row(g_mean, x) + 2.0 * _per_row(g_var, x) * centered) / count
  return g_x.astype(x.dtype), (dotp * rstd).sum(0), sum_g.sum(0)


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def _inner_axes(x: jax.Array, per_channel: jax.Array) -> tuple[int, ...]:
  """x's axes between the rows and the channels (per_channel's shape)."""
  return tuple(range(1, x.ndim - per_channel.ndim))


def _group_sum(per_row: jax.Array, groups: int) -> jax.Array:
  """(L, *F) sums per row -> (groups, *F) sums per group of consecutive rows."""
  return per_row.reshape(groups, per_row.shape[0] // groups, *per_row.shape[1:]).sum(1)


def _per_row(per_group: jax.Array, x: jax.Array) -> jax.Array:
  """(groups, *F) -> broadcastable against x (L, ..., *F): each row its group's value."""
  groups, channels = per_group.shape[0], per_group.shape[1:]
  if groups > 1:
    per_group = jnp.repeat(per_group, x.shape[0] // groups, axis=0)
  return per_group.reshape(per_group.shape[0], *(1,) * (x.ndim - 1 - len(channels)), *channels)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """(x - mean) * rsqrt(var + eps) * scale + bias in the statistics' dtype, as nn.BatchNorm."""
  y = x - mean
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return jnp.asarray(y * mul + bias, dtype)
