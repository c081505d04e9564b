"""The original RepMLP block (Ding et al., arXiv 2105.01883 v1) in Flax linen, NHWC.

RepMLP(C -> O) on an H x W map cut into h x w partitions (hp = H/h by wp = W/w of them):
- Global Perceptron (only when the map has several partitions): average-pool each partition to
  one pixel, BatchNorm (`avg/bn`), flatten channel-major to C*hp*wp, `fc1_fc2/fc1` -> ReLU ->
  `fc1_fc2/fc2`, and add the result onto every pixel of its partition.
- Partition Perceptron: each partition, flattened channel-major (c, y, x) as the official code
  does, goes through `fc3`, a grouped FC (g groups, C*h*w -> O*h*w, no bias), then `fc3_bn`, a
  BatchNorm over the O*h*w outputs (the official BatchNorm1d).
- Local Perceptron: conv branches `repconv{k}` (k x k, k odd, C -> O, g groups, 'same' padding,
  each with its BatchNorm) on the h x w partitions, added to the fc3 output.
The partitions are then put back in place (a true inverse, unlike RepMLPNet's block).

`deploy=True` is the form `repmlp_jax.reparam` produces: three FCs (fc1 with the pooling BN
folded in, fc2, and fc3 with a bias `fc3_bias` holding fc3_bn and every conv branch).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from repmlp_jax.models import layers

Dtype = Any
Precision = Any


class AvgPoolBN(layers.Part):
  """Average of each h x w partition, then (training form only) BatchNorm: the official `avg`."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    pooled = jnp.mean(x, axis=(2, 4))  # (N, hp, h, wp, w, C) -> (N, hp, wp, C)
    if self.deploy:
      return pooled  # The BatchNorm lives in fc1 now.
    return self.norm(train, 'bn')(pooled)


class FC1FC2(nn.Module):
  """fc1 -> ReLU -> fc2 over the flattened partition averages: the official `fc1_fc2`."""
  hidden: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, v: jax.Array) -> jax.Array:
    features = v.shape[-1]
    v = nn.Dense(self.hidden, dtype=self.dtype, precision=self.precision, name='fc1')(v)
    return nn.Dense(features, dtype=self.dtype, precision=self.precision, name='fc2')(nn.relu(v))


class RepMLP(layers.Part):
  """The v1 RepMLP: Global, Partition and Local Perceptrons on a fixed H x W input."""
  in_channels: int
  out_channels: int
  H: int
  W: int
  h: int
  w: int
  reparam_conv_k: Sequence[int] = ()
  fc1_fc2_reduction: int = 1  # fc1 maps C*hp*wp values to C*hp*wp // reduction.
  fc3_groups: int = 1

  @property
  def has_global_perceptron(self) -> bool:
    """The official block has no Global Perceptron when the map is a single partition."""
    return self.H != self.h or self.W != self.w

  def check_settings(self) -> None:
    c, o, g = self.in_channels, self.out_channels, self.fc3_groups
    if self.H % self.h or self.W % self.w:
      raise ValueError(f'RepMLP: the {self.H}x{self.W} map does not split into {self.h}x{self.w} '
                       'partitions; choose h, w that divide H, W.')
    if c % g or o % g:
      raise ValueError(f'RepMLP: in_channels ({c}) and out_channels ({o}) must both be multiples '
                       f'of fc3_groups ({g}).')
    # Kernels larger than the partition are allowed, as in the official code (the padded part
    # only ever sees zeros); they are merely pointless.
    bad = [k for k in self.reparam_conv_k if k % 2 == 0]
    if bad:
      raise ValueError(f'RepMLP: conv branch sizes must be odd (\'same\' padding); got {bad} in '
                       f'reparam_conv_k={tuple(self.reparam_conv_k)}.')
    partitions = self.H // self.h * self.W // self.w
    if self.has_global_perceptron and c * partitions < self.fc1_fc2_reduction:
      raise ValueError(f'RepMLP: fc1_fc2_reduction ({self.fc1_fc2_reduction}) leaves fc1 no '
                       'output.')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H, W, O)."""
    self.check_settings()
    c, o, g, h, w = self.in_channels, self.out_channels, self.fc3_groups, self.h, self.w
    if x.shape[1:] != (self.H, self.W, c):
      raise ValueError(f'RepMLP built for (N, {self.H}, {self.W}, {c}) inputs got {x.shape}.')
    n, hp, wp, hw = x.shape[0], self.H // h, self.W // w, h * w
    x = x.reshape(n, hp, h, wp, w, c)
    if self.has_global_perceptron:
      pooled = AvgPoolBN(deploy=self.deploy, dtype=self.dtype, bn_groups=self.bn_groups,
                         name='avg')(x, train=train)  # (N, hp, wp, C)
      # Flattened channel-major (c, i, j) as the official code, so fc1/fc2 import by transposing.
      v = pooled.transpose(0, 3, 1, 2).reshape(n, c * hp * wp)
      v = FC1FC2(c * hp * wp // self.fc1_fc2_reduction, self.dtype, self.precision,
                 name='fc1_fc2')(v)
      x = x + v.reshape(n, c, hp, wp).transpose(0, 2, 3, 1)[:, :, None, :, None, :]
    # Partition rows (N, hp, wp, g, C/g*h*w), each flattened channel-major (c, y, x).
    rows = x.transpose(0, 1, 3, 5, 2, 4).reshape(n, hp, wp, g, c // g * hw)
    fc3 = self.param('fc3', nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0),
                     (g, c // g * hw, o // g * hw))
    out = jnp.einsum('nijgp,gpq->nijgq', rows, fc3.astype(self.dtype), precision=self.precision)
    out = out.reshape(n, hp, wp, o * hw)
    if self.deploy:
      out = out + self.param('fc3_bias', nn.initializers.zeros, (o * hw,)).astype(self.dtype)
    else:
      out = self.norm(train, 'fc3_bn')(out)
      if self.reparam_conv_k:
        maps = x.transpose(0, 1, 3, 2, 4, 5).reshape(n * hp * wp, h, w, c)
        for k in self.reparam_conv_k:
          y = self.conv_bn(o, k, padding=k // 2, groups=g, name=f'repconv{k}')(maps,
                                                                               train=train)
          out = out + y.reshape(n, hp, wp, hw, o).transpose(0, 1, 2, 4, 3).reshape(out.shape)
    out = out.reshape(n, hp, wp, o, h, w).transpose(0, 1, 4, 2, 5, 3)
    return out.reshape(n, self.H, self.W, o)
