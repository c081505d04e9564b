"""BatchNorm as PyTorch trains it, optionally with statistics per group of images.

`BatchNorm` holds the variables of flax's `nn.BatchNorm` (params `scale`, `bias`; batch_stats
`mean`, `var`; float32, shape (C,)), so checkpoints, the PyTorch key maps and reparam see no
difference. It differs in training mode only:

- the running variance is updated with the unbiased batch variance (n / (n - 1)), as
  `torch.nn.BatchNorm2d` does (flax uses the biased one); normalization uses the biased one, as
  both do;
- inside `grouped_statistics(batch_size, group_size)` the batch is split into consecutive groups
  of `group_size` images, each normalized with its own statistics, as under PyTorch's
  DistributedDataParallel with plain BatchNorm, where each GPU normalizes over its own images.
  The running statistics are updated with the mean over the groups of each group's statistics.

Statistics are reduced in at least float32 whatever the compute dtype. Evaluation mode (running
averages) computes exactly what `nn.BatchNorm` computes.

The leading axis of every BatchNorm input must be image-major (all rows of image 0, then of
image 1, ...): every model of the package feeds its BatchNorms that way, also where the leading
axis holds windows or partition rows rather than images.
"""

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

# Read when a model builds its BatchNorms (layers.batch_norm), i.e. while it is traced: enter
# `grouped_statistics` inside the function that is jitted, around `model.apply`.
_NUM_GROUPS = contextvars.ContextVar('repmlp_jax_batch_norm_groups', default=1)


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


@contextlib.contextmanager
def grouped_statistics(batch_size: int, group_size: int) -> Iterator[None]:
  """Training-mode BatchNorms built in this context normalize groups of `group_size` images.

  Args:
    batch_size, group_size: as for `num_groups`.
  Yields:
    Nothing; BatchNorms built by `layers.batch_norm` inside the context use the groups.
  """
  token = _NUM_GROUPS.set(num_groups(batch_size, group_size))
  try:
    yield
  finally:
    _NUM_GROUPS.reset(token)


def current_num_groups() -> int:
  """The number of BatchNorm groups of the innermost `grouped_statistics` (1 outside any)."""
  return _NUM_GROUPS.get()


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running variance and optional groups."""
  use_running_average: bool = False
  num_groups: int = 1  # Equal, consecutive slices of the leading axis, normalized separately.
  momentum: float = 0.9  # Of the running averages: PyTorch's momentum 0.1.
  epsilon: float = 1e-5
  dtype: Any = None  # Of the output; None: that of the input.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)

    groups = self.num_groups
    if x.shape[0] % groups:
      raise ValueError(f'BatchNorm {self.name}: a leading axis of {x.shape[0]} does not split '
                       f'into {groups} groups; its rows must be image-major, whole images per '
                       'group.')
    count = x.size // x.shape[-1] // groups  # Values per channel in one group: PyTorch's n.
    if count < 2:
      raise ValueError(f'BatchNorm {self.name} needs more than one value per channel and group '
                       f'in training mode (input {x.shape}, {groups} group(s)); use larger '
                       'groups (bn_group_size) or batches.')
    # Float32 at least (bfloat16 compute), float64 kept.
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y, mean, var = normalize_batch(x.reshape(groups, -1, x.shape[-1]), scale.astype(stat_dtype),
                                   bias.astype(stat_dtype), self.epsilon, jnp.dtype(dtype))
    if not self.is_initializing():
      m = self.momentum
      unbiased = var * (count / (count - 1))
      ra_mean.value = (m * ra_mean.value + (1 - m) * mean.mean(0)).astype(ra_mean.value.dtype)
      ra_var.value = (m * ra_var.value + (1 - m) * unbiased.mean(0)).astype(ra_var.value.dtype)
    return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                    dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalization of each group with its own statistics.

  Args:
    x: (G, M, C): G groups of M values per channel, in the compute dtype.
    scale, bias: (C,) in the statistics' dtype (float32 at least).
    epsilon: added to the variance.
    dtype: of the output y.
  Returns:
    y (G, M, C) in `dtype`; each group's mean and biased variance (G, C), in the statistics'
    dtype, from one pass over x (E[x^2] - E[x]^2).

  The gradient is written out, the textbook BatchNorm backward (one pass for the two sums, one
  for the input's gradient), rather than derived through the statistics: the derived one took
  some fifteen XLA kernels per BatchNorm, which dominated the compilation of a training step.
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon, dtype)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon, dtype):
  xs = x.astype(scale.dtype)
  mean = xs.mean(1)
  var = jnp.maximum(0.0, (xs * xs).mean(1) - mean * mean)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = _normalize(x, mean[:, None], var[:, None], scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, rstd, scale)


def _normalize_batch_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype  # In rstd already; the output's dtype is the cotangent's.
  x, mean, rstd, scale = residuals
  g_y, g_mean, g_var = cotangents
  count = x.shape[1]
  centered = x.astype(scale.dtype) - mean[:, None]
  x_hat = centered * rstd[:, None]
  g = g_y.astype(scale.dtype)
  sum_g, sum_g_x_hat = g.sum(1), (g * x_hat).sum(1)  # (G, C): one pass over g and x.
  g_x = (rstd * scale)[:, None] * (g - (sum_g[:, None] + x_hat * sum_g_x_hat[:, None]) / count)
  # The statistics' own cotangents (zero when they feed only the running averages).
  g_x = g_x + (g_mean[:, None] + 2.0 * g_var[:, None] * centered) / count
  return g_x.astype(x.dtype), sum_g_x_hat.sum(0), sum_g.sum(0)


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """(x - mean) * rsqrt(var + eps) * scale + bias in the statistics' dtype, as nn.BatchNorm."""
  y = x - mean
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return jnp.asarray(y * mul + bias, dtype)
