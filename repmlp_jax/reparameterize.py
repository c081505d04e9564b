"""Structural re-parameterization: training-form variables -> deploy-form variables.

Pure functions over pytrees, jit-able (the model is static). Locality Injection: each conv branch
k x k with its BatchNorm becomes a fused kernel, kernels are padded to the largest size and
summed, and the sum is turned into a grouped FC by convolving an identity (under jax.vmap over
sharesets); fc3_bn is folded into fc3 and the converted branches are added. Every BatchNorm that
follows a conv (stem, downsampling, FFN) is folded into that conv. The BatchNorms that precede a
block (prebn1, prebn2) and the head's norm stay, as in the official deploy form.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from repmlp_jax import layers
from repmlp_jax import pure_mlp
from repmlp_jax import reparameterize_resnet  # Uses this module's helpers at call time only.
from repmlp_jax import repmlp_resnet
from repmlp_jax import repmlpnet

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


def fuse_repmlp_block(params: Params, stats: Params, h: int, w: int) -> dict[str, Any]:
  """RepMLPBlock training variables -> deploy params {'gp', 'fc3' (S, hw, hw), 'fc3_bias' (S, hw)}."""
  scale, shift = bn_scale_shift(params['fc3_bn'], stats['fc3_bn'])  # (S,)
  fc3 = params['fc3'] * scale[:, None, None]  # (S, h*w, h*w): BN scales each output.
  bias = jnp.broadcast_to(shift[:, None], fc3.shape[:2])  # (S, h*w)
  branches = sorted((name for name in params if name.startswith('repconv')),
                    key=lambda name: params[name]['conv']['kernel'].shape[0])
  if branches:
    fused = [fuse_conv_bn(params[name], stats[name])['conv'] for name in branches]
    size = fused[-1]['kernel'].shape[0]
    kernel = sum(pad_kernel(f['kernel'], size) for f in fused)  # (K, K, 1, S)
    fc3 = fc3 + conv_to_fc(kernel, h, w)
    bias = bias + sum(f['bias'] for f in fused)[:, None]
  return {'gp': params['gp'], 'fc3': fc3, 'fc3_bias': bias}


def _reparam_repmlpnet(model: repmlpnet.RepMLPNet, variables: Params) -> dict[str, Any]:
  params, stats = variables['params'], variables['batch_stats']
  new_params, new_stats = {}, {}
  new_params['conv_embedding'] = fuse_conv_bn(params['conv_embedding'], stats['conv_embedding'])
  for s, (depth, p) in enumerate(zip(model.depths, model.partitions)):
    if s > 0:
      name = f'embeds_{s - 1}'
      new_params[name] = fuse_conv_bn(params[name], stats[name])
    for b in range(depth):
      name = f'stages_{s}_{b}'
      unit, unit_stats = params[name], stats[name]
      ffn, ffn_stats = unit['ffn_block'], unit_stats['ffn_block']
      new_params[name] = {
          'prebn1': unit['prebn1'],
          'repmlp_block': fuse_repmlp_block(unit['repmlp_block'], unit_stats['repmlp_block'], p, p),
          'prebn2': unit['prebn2'],
          'ffn_block': {k: fuse_conv_bn(ffn[k], ffn_stats[k]) for k in ('ffn_fc1', 'ffn_fc2')},
      }
      new_stats[name] = {'prebn1': unit_stats['prebn1'], 'prebn2': unit_stats['prebn2']}
  new_params['head_norm'], new_stats['head_norm'] = params['head_norm'], stats['head_norm']
  new_params['head'] = params['head']
  return {'params': new_params, 'batch_stats': new_stats}


def reparam_variables(model, variables: Params) -> dict[str, Any]:
  """The deploy-form variables of `model`'s training-form `variables` (pure, jit-able)."""
  if model.deploy:
    raise ValueError('reparam takes a training-form model; this one is already deploy=True.')
  if isinstance(model, repmlpnet.RepMLPNet):
    return _reparam_repmlpnet(model, variables)
  if isinstance(model, (repmlp_resnet.RepMLPResNet, pure_mlp.PureMLPNet)):
    return reparameterize_resnet.reparam_variables(model, variables)
  raise TypeError(f'No re-parameterization is defined for {type(model).__name__}.')


@functools.partial(jax.jit, static_argnums=0)
def _reparam_compiled(model, variables: Params) -> dict[str, Any]:
  return reparam_variables(model, variables)


def reparam(model, variables: Params):
  """Converts a training-form model and its variables to the equivalent deploy form.

  Pure: `variables` is not modified. Compiled once per model (the eager form would dispatch
  thousands of small ops); `reparam_variables` is the same function uncompiled, to be used
  inside a caller's own jit.

  Args:
    model: a training-form model (`deploy=False`) from `create_model`.
    variables: its {'params', 'batch_stats'}.
  Returns:
    (deploy_model, deploy_variables), with
    deploy_model.apply(deploy_variables, x) == model.apply(variables, x, train=False).
  """
  return model.clone(deploy=True), _reparam_compiled(model, variables)
