"""Re-parameterization rules on inputs the whole-model tests do not reach, in seconds.

- RepMLPNet's conv branches in an order other than their sizes': the parameter tree orders them
  by name ('repconv1' < 'repconv11' < 'repconv3'), so the fusion must find the largest kernel
  by size, not take the last branch. Float64, train form == deploy form (<= 1e-10).
- The v1 rules (RepMLP-ResNet, ResNet-50, the CIFAR model) applied to a hand-built tree: each
  subtree gets its own rule (RepMLP, conv-BN, untouched), and a BatchNorm no rule covers is
  refused with its path rather than dropped.
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repmlp_jax.models import layers
from repmlp_jax.models import repmlp_v1
from repmlp_jax.reparameterize import fusion
from repmlp_jax.reparameterize import repmlpnet as rp_repmlpnet
from repmlp_jax.reparameterize import resnet as rp_resnet
from tests import fast_init
from tests import helpers


def test_repmlpnet_block_equivalence_float64_with_kernel_sizes_out_of_name_order():
  # (11, 1, 3): the tree holds repconv1, repconv11, repconv3, so the last branch is not the
  # largest; an 11x11 kernel on 4x4 windows is valid (only its centre 7x7 meets the window).
  c, h, s, kernels = 8, 4, 2, (11, 1, 3)
  with jax.enable_x64(True):
    block = layers.RepMLPBlock(c, h, h, s, kernels, dtype=jnp.float64, precision='highest')
    shape = (2, 2 * h, 3 * h, c)  # 2x3 windows
    variables = fast_init.random_variables(block, shape, seed=1, dtype=jnp.float64)
    assert [n for n in variables['params'] if n.startswith('repconv')] == [
        'repconv1', 'repconv11', 'repconv3']
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape))
    deploy = {'params': rp_repmlpnet.fuse_repmlp_block(
        variables['params'], variables['batch_stats'], h, h)}
    y = block.apply(variables, x)
    y_deploy = block.clone(deploy=True).apply(deploy, x)
    assert y.dtype == jnp.float64
    assert helpers.relative_error(y, y_deploy) <= 1e-10


def _conv_bn(rng, k, c, o):
  """A training-form conv-BN's (params, stats), BatchNorm far from identity."""
  params = {'conv': {'kernel': rng.normal(size=(k, k, c, o))},
            'bn': {'scale': rng.uniform(0.2, 0.6, o), 'bias': rng.normal(size=o)}}
  return params, {'bn': {'mean': rng.normal(size=o), 'var': rng.uniform(0.5, 2.0, o)}}


def test_v1_rules_apply_to_their_own_subtrees():
  rng = np.random.default_rng(0)
  block = repmlp_v1.RepMLP(4, 4, 8, 8, 4, 4, (1, 3), 2, 2)  # Global Perceptron and two branches
  repmlp = fast_init.random_variables(block, (1, 8, 8, 4), seed=3)
  stem, stem_stats = _conv_bn(rng, 3, 3, 4)
  shortcut, shortcut_stats = _conv_bn(rng, 1, 4, 4)
  linear = {'kernel': rng.normal(size=(4, 10)), 'bias': rng.normal(size=10)}
  params = {'stem': stem, 'stage0_0': {'repmlp': repmlp['params'], 'shortcut': shortcut},
            'linear': linear}
  stats = {'stem': stem_stats,
           'stage0_0': {'repmlp': repmlp['batch_stats'], 'shortcut': shortcut_stats}}
  model = types.SimpleNamespace(h=4, w=4)  # The partition every RepMLP of the model shares.
  got = rp_resnet.reparam_variables(model, {'params': params, 'batch_stats': stats})
  expected = {'params': {
      'stem': fusion.fuse_conv_bn(stem, stem_stats),
      'stage0_0': {'repmlp': rp_resnet.fuse_repmlp(repmlp['params'], repmlp['batch_stats'], 4, 4),
                   'shortcut': fusion.fuse_conv_bn(shortcut, shortcut_stats)},
      'linear': linear}}
  chex.assert_trees_all_equal(got, expected)
  assert set(got['params']['stage0_0']['repmlp']) == {'fc1_fc2', 'fc3', 'fc3_bias'}


@pytest.mark.parametrize('params, stats, where', [
    # A BatchNorm beside a layer that is not a conv: no rule folds it.
    ({'head': {'bn': {'scale': np.ones(2), 'bias': np.zeros(2)},
               'dense': {'kernel': np.ones((2, 2))}}},
     {'head': {'bn': {'mean': np.zeros(2), 'var': np.ones(2)}}}, "['mean', 'var'] under /head/bn."),
    # Statistics with no parameters at all, at the top of the tree.
    ({'linear': {'kernel': np.ones((2, 2))}}, {'norm': {'mean': np.zeros(2)}}, "['norm'] under /."),
])
def test_v1_rules_refuse_a_batch_norm_they_cannot_fold(params, stats, where):
  model = types.SimpleNamespace(h=4, w=4)
  with pytest.raises(ValueError, match='No re-parameterization rule for the BatchNorm') as info:
    rp_resnet.reparam_variables(model, {'params': params, 'batch_stats': stats})
  assert str(info.value).endswith(where), str(info.value)
