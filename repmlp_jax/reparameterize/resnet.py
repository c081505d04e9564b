"""Re-parameterization of the v1 models (RepMLP-ResNet, ResNet-50, the pure-MLP CIFAR model).

Pure functions over pytrees, composed from `repmlp_jax.reparameterize.fusion`'s helpers. Each RepMLP
becomes three FCs: the BatchNorm after the partition pooling is folded into fc1 (an affine map
of fc1's input), fc3_bn and every conv branch (Locality Injection, through `conv_to_fc`) into
fc3, which gains a bias. Every other conv-BN becomes a conv with bias, as in the official v1
deploy form, so the deploy models hold no BatchNorm at all.
"""

from typing import Any, Mapping

import jax.numpy as jnp

from repmlp_jax.reparameterize import fusion as rp

Params = Mapping[str, Any]


def fuse_avg_bn_into_fc1(fc1: Params, bn_params: Params, bn_stats: Params) -> dict[str, Any]:
  """Folds the BatchNorm(C) after the partition pooling into fc1.

  fc1 reads the pooled map flattened channel-major (c, i, j), so each of the C affine factors
  covers hp*wp consecutive inputs: fc1(v * s + t) = v @ (s[:, None] * K) + (t @ K + b).

  Args:
    fc1: {'kernel': (C*hp*wp, hidden), 'bias': (hidden,)}.
    bn_params, bn_stats: the BatchNorm's {'scale', 'bias'} and {'mean', 'var'}, each (C,).
  Returns:
    The deploy fc1 {'kernel', 'bias'}, same shapes.
  """
  kernel = fc1['kernel']
  scale, shift = rp.bn_scale_shift(bn_params, bn_stats)
  reps = kernel.shape[0] // scale.shape[0]  # hp * wp
  scale, shift = jnp.repeat(scale, reps), jnp.repeat(shift, reps)  # (C*hp*wp,)
  bias = fc1['bias'] + jnp.matmul(shift, kernel, precision=rp.HIGHEST)
  return {'kernel': kernel * scale[:, None], 'bias': bias}


def fuse_repmlp(params: Params, stats: Params, h: int, w: int) -> dict[str, Any]:
  """A training-form v1 RepMLP's variables -> its deploy params (three FCs).

  Args:
    params, stats: the RepMLP's params and batch_stats (fc3 (g, C/g*h*w, O/g*h*w), fc3_bn over
      O*h*w, optional `avg`/`fc1_fc2` (Global Perceptron) and `repconv{k}` branches).
    h, w: its partition size.
  Returns:
    {'fc1_fc2' (when present), 'fc3' (same shape), 'fc3_bias' (O*h*w,)}.
  """
  fc3 = params['fc3']
  g, og_hw = fc3.shape[0], fc3.shape[2]
  scale, shift = rp.bn_scale_shift(params['fc3_bn'], stats['fc3_bn'])  # (O*h*w,)
  fc3 = fc3 * scale.reshape(g, 1, og_hw)  # BN scales each output column.
  bias = shift
  branches = [name for name in params if name.startswith('repconv')]
  if branches:
    fused = [rp.fuse_conv_bn(params[b], stats[b])['conv'] for b in branches]
    size = max(f['kernel'].shape[0] for f in fused)
    kernel = sum(rp.pad_kernel(f['kernel'], size) for f in fused)  # (K, K, C/g, O)
    fc3 = fc3 + rp.conv_to_fc(kernel, h, w, groups=g)
    bias = bias + jnp.repeat(sum(f['bias'] for f in fused), h * w)  # One bias per channel.
  out = {'fc3': fc3, 'fc3_bias': bias}
  if 'fc1_fc2' in params:
    out['fc1_fc2'] = {
        'fc1': fuse_avg_bn_into_fc1(params['fc1_fc2']['fc1'], params['avg']['bn'],
                                    stats['avg']['bn']),
        'fc2': params['fc1_fc2']['fc2'],
    }
  return out


def _fold(params: Params, stats: Params, h: int, w: int, path: str) -> dict[str, Any]:
  """Deploy params of one subtree: RepMLPs -> three FCs, conv-BNs -> biased convs, rest as is."""
  if 'fc3' in params:
    return fuse_repmlp(params, stats, h, w)
  if 'conv' in params and 'bn' in params:
    return rp.fuse_conv_bn(params, stats)
  out = {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      out[name] = _fold(value, stats.get(name, {}), h, w, f'{path}/{name}')
    else:
      out[name] = value
  unused = set(stats) - set(params)
  if unused:  # A BatchNorm outside any conv-BN or RepMLP would be dropped silently.
    raise ValueError(f'No re-parameterization rule for the BatchNorm(s) {sorted(unused)} under '
                     f'{path or "/"}.')
  return out


def reparam_variables(model, variables: Params) -> dict[str, Any]:
  """Deploy-form variables of a training-form RepMLPResNet or PureMLPNet (pure, jit-able).

  Every RepMLP of these models shares the model's partition (model.h, model.w).
  Returns:
    {'params': ...}: the deploy forms hold no BatchNorm, hence no batch_stats.
  """
  params = _fold(variables['params'], variables.get('batch_stats', {}), model.h, model.w, '')
  return {'params': params}

