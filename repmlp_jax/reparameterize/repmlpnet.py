"""Re-parameterization of RepMLPNet: training-form variables -> deploy-form variables.

Locality Injection: each conv branch k x k with its BatchNorm becomes a fused kernel, kernels are
padded to the largest size and summed, and the sum is turned into a grouped FC by convolving an
identity (under jax.vmap over sharesets); fc3_bn is folded into fc3 and the converted branches are
added. Every BatchNorm that follows a conv (stem, downsampling, FFN) is folded into that conv, and
prebn2 into the FFN's first 1x1 conv, which it precedes. prebn1 stays (fc3 shares one kernel
across the channels of a shareset, so a per-channel scale cannot enter it), and so does the
head's norm (it defines `pre_logits`).
"""

from typing import Any, Mapping

import jax.numpy as jnp

from repmlp_jax.models import repmlpnet
from repmlp_jax.reparameterize.fusion import (bn_scale_shift, conv_to_fc, fuse_bn_before,
                                              fuse_conv_bn, pad_kernel)

Params = Mapping[str, Any]


def fuse_repmlp_block(params: Params, stats: Params, h: int, w: int) -> dict[str, Any]:
  """RepMLPBlock training variables -> deploy {'gp', 'fc3' (S, hw, hw), 'fc3_bias' (S, hw)}."""
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


def reparam_variables(model: repmlpnet.RepMLPNet, variables: Params) -> dict[str, Any]:
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
      fc1 = fuse_conv_bn(ffn['ffn_fc1'], ffn_stats['ffn_fc1'])['conv']
      fc1 = dict(zip(('kernel', 'bias'), fuse_bn_before(fc1['kernel'], fc1['bias'],
                                                         unit['prebn2'], unit_stats['prebn2'])))
      new_params[name] = {
          'prebn1': unit['prebn1'],
          'repmlp_block': fuse_repmlp_block(unit['repmlp_block'], unit_stats['repmlp_block'], p, p),
          'ffn_block': {'ffn_fc1': {'conv': fc1},
                        'ffn_fc2': fuse_conv_bn(ffn['ffn_fc2'], ffn_stats['ffn_fc2'])},
      }
      new_stats[name] = {'prebn1': unit_stats['prebn1']}
  new_params['head_norm'], new_stats['head_norm'] = params['head_norm'], stats['head_norm']
  new_params['head'] = params['head']
  return {'params': new_params, 'batch_stats': new_stats}
