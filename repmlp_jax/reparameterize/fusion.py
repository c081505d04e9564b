"""The fusion maths of structural re-parameterization, shared by every model family.

Pure functions over arrays: an eval-mode BatchNorm as an affine map, folded into the linear op
before it; kernels padded to a common size; a grouped conv on an h x w map turned into the
equivalent grouped FC by convolving an identity (under jax.vmap over groups).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from repmlp_jax.models import layers

Params = Mapping[str, Any]
HIGHEST = lax.Precision.HIGHEST


def bn_scale_shift(bn_params: Params, bn_stats: Params,
                   eps: float = layers.BN_EPSILON) -> tuple[jax.Array, jax.Array]:
  """The affine map of an eval-mode BatchNorm: y = x * scale + shift, per channel."""
  scale = bn_params['scale'] * lax.rsqrt(bn_stats['var'] + eps)
  return scale, bn_params['bias'] - bn_stats['mean'] * scale


def fuse_bn(kernel: jax.Array, bn_params: Params, bn_stats: Params) -> tuple[jax.Array, jax.Array]:
  """Folds a BatchNorm into the linear op before it; the last kernel axis is output channels.

  Returns:
    (kernel * scale, shift): the fused kernel (same shape) and the bias (out,).
  """
  scale, shift = bn_scale_shift(bn_params, bn_stats)
  return kernel * scale, shift


def fuse_bn_before(kernel: jax.Array, bias: jax.Array, bn_params: Params,
                   bn_stats: Params) -> tuple[jax.Array, jax.Array]:
  """Folds a BatchNorm into the linear op after it (no padding in between); exact.

  op(x * scale + shift) = x @ (scale[:, None] * K) + (shift @ K + b), the BN's channels being the
  op's input channels.

  Args:
    kernel: (..., I, O), e.g. a 1x1 conv's HWIO kernel; bias: (O,).
    bn_params, bn_stats: the BatchNorm's {'scale', 'bias'} and {'mean', 'var'}, each (I,).
  Returns:
    (kernel (same shape), bias (O,)).
  """
  if any(k != 1 for k in kernel.shape[:-2]):  # Zero padding would see the shift only inside.
    raise ValueError(f'fuse_bn_before: a BN folds exactly only into a 1x1 op; got {kernel.shape}.')
  scale, shift = bn_scale_shift(bn_params, bn_stats)
  matrix = kernel.reshape(kernel.shape[-2:])  # (I, O)
  return kernel * scale[:, None], bias + jnp.matmul(shift, matrix, precision=HIGHEST)


def pad_kernel(kernel: jax.Array, size: int) -> jax.Array:
  """Zero-pads an HWIO kernel (k, k, I, O) to (size, size, I, O), centred (k and size odd)."""
  p = (size - kernel.shape[0]) // 2
  return jnp.pad(kernel, ((p, p), (p, p), (0, 0), (0, 0)))


def conv_to_fc(kernel: jax.Array, h: int, w: int, groups: int | None = None) -> jax.Array:
  """The grouped FC equal to a grouped conv (stride 1, 'same' zero padding) on h x w maps.

  Args:
    kernel: (kh, kw, C/g, O), the HWIO kernel of a conv with g groups (kh, kw odd).
    h, w: the map size.
    groups: g; default O, one filter of one input channel per group (RepMLPNet's depthwise
      branches, kernel (k, k, 1, S)).
  Returns:
    (g, C/g*h*w, O/g*h*w): each group's FC kernel (in, out), i.e. the conv applied to every basis
    map of one group's input; inputs and outputs are flattened channel-major (c, y, x), as the
    official code flattens partitions. Depthwise: (S, h*w, h*w).
  """
  kh, kw, cg, o = kernel.shape
  g = o if groups is None else groups
  if o % g:
    raise ValueError(f'conv_to_fc: {o} output channels do not split into {g} groups.')
  og, n = o // g, cg * h * w
  # Basis maps of one group's input, NHWC: (C/g*h*w, h, w, C/g).
  identity = jnp.eye(n, dtype=kernel.dtype).reshape(n, cg, h, w).transpose(0, 2, 3, 1)

  def one_group(filt):  # (kh, kw, C/g, O/g) -> (C/g*h*w, O/g*h*w)
    out = lax.conv_general_dilated(identity, filt, (1, 1), [(kh // 2, kh // 2), (kw // 2, kw // 2)],
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=HIGHEST)
    return out.transpose(0, 3, 1, 2).reshape(n, og * h * w)

  return jax.vmap(one_group, in_axes=3)(kernel.reshape(kh, kw, cg, g, og))


def fuse_conv_bn(params: Params, stats: Params) -> dict[str, Any]:
  """A training-form ConvBN's variables -> the deploy ConvBN's params {'conv': {kernel, bias}}."""
  kernel, bias = fuse_bn(params['conv']['kernel'], params['bn'], stats['bn'])
  return {'conv': {'kernel': kernel, 'bias': bias}}
