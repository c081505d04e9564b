"""The v1 RepMLP block: helpers by hand, train form == deploy form, and the PyTorch reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from repmlp_jax.models import repmlp_v1 as repmlp_block
from repmlp_jax.reparameterize import fusion as rp
from repmlp_jax.reparameterize import resnet as rpr
from tests import fast_init
from tests import helpers
from tests import rounding
from tests import torch_reference as tr

# (C, O, H, W, h, w, K, fc1_fc2_reduction, fc3_groups)
CONFIGS = {
    'grid2x2-reduction2': (4, 4, 8, 8, 4, 4, (1, 3), 2, 2),
    'C!=O-rectangular': (6, 4, 8, 12, 4, 6, (1, 3, 5), 1, 2),
    'kernels1357-C<O': (4, 8, 14, 14, 7, 7, (1, 3, 5, 7), 1, 4),
    'one-partition-no-gp': (2, 6, 5, 5, 5, 5, (1, 3, 5), 1, 2),
    'no-branches-g1': (3, 5, 6, 6, 3, 3, (), 1, 1),
}


def _block(config, deploy=False, dtype=jnp.float32):
  c, o, big_h, big_w, h, w, k, r, g = config
  return repmlp_block.RepMLP(c, o, big_h, big_w, h, w, k, r, g, deploy=deploy, dtype=dtype)


def _variables(block, seed=0, dtype=jnp.float32, batch=3):
  shape = (batch, block.H, block.W, block.in_channels)
  x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=shape), dtype)
  return x, fast_init.random_variables(block, shape, seed, dtype)


def _deploy(block, variables):
  return block.clone(deploy=True), {'params': rpr.fuse_repmlp(
      variables['params'], variables['batch_stats'], block.h, block.w)}


@functools.partial(jax.jit, static_argnums=0)
def _train_and_deploy_outputs(block, variables, x):
  """Eval outputs of the training and deploy forms, and the deploy variables (one compile)."""
  deploy_block, deploy_vars = _deploy(block, variables)
  return block.apply(variables, x), deploy_block.apply(deploy_vars, x), deploy_vars


def test_conv_to_fc_grouped_by_hand():
  # One group, C = 2 -> O = 1, 1x1 kernel (a, b) on a 1x2 map: out(x) = a*in0(x) + b*in1(x).
  kernel = jnp.array([2.0, 3.0]).reshape(1, 1, 2, 1)
  fc = np.asarray(rp.conv_to_fc(kernel, 1, 2, groups=1))
  assert fc.shape == (1, 4, 2)  # (g, C/g*h*w, O/g*h*w), inputs flattened (c, y, x)
  np.testing.assert_array_equal(fc[0], [[2, 0], [0, 2], [3, 0], [0, 3]])
  # Two groups of one channel each, O = 4: group 1's outputs (channels 2, 3) read input channel 1.
  kernel = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  fc = np.asarray(rp.conv_to_fc(kernel, 1, 1, groups=2))
  np.testing.assert_array_equal(fc, [[[1, 2]], [[3, 4]]])


def test_conv_to_fc_grouped_matches_the_convolution():
  c, o, g, h, w = 4, 6, 2, 3, 5
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):  # Exact up to float64 rounding: the FC is the convolution.
    kernel = jnp.asarray(rng.normal(size=(3, 3, c // g, o)), jnp.float64)
    x = jnp.asarray(rng.normal(size=(7, h, w, c)), jnp.float64)
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=g, precision='highest')
    fc = rp.conv_to_fc(kernel, h, w, groups=g)  # (g, C/g*h*w, O/g*h*w)
    rows = x.transpose(0, 3, 1, 2).reshape(7, g, c // g * h * w)
    via_fc = jnp.einsum('ngp,gpq->ngq', rows, fc, precision='highest')
    assert fc.dtype == jnp.float64
    assert helpers.relative_error(conv.transpose(0, 3, 1, 2), via_fc.reshape(7, o, h, w)) <= 1e-10


def test_fuse_avg_bn_into_fc1_by_hand():
  # C = 2 channels, hp*wp = 2 partitions: fc1 inputs are (c0 p0, c0 p1, c1 p0, c1 p1).
  with jax.enable_x64(True):  # var + eps == 1 up to float64 rounding: the values are exact.
    fc1 = {'kernel': jnp.arange(8.0).reshape(4, 2), 'bias': jnp.array([1.0, -1.0])}
    bn = {'scale': jnp.array([2.0, 0.5]), 'bias': jnp.array([1.0, 0.0])}
    stats = {'mean': jnp.array([0.0, 2.0]), 'var': jnp.array([1.0, 1.0]) - 1e-5}
    fused = rpr.fuse_avg_bn_into_fc1(fc1, bn, stats)  # BN: c0 -> 2v + 1, c1 -> 0.5v - 1
    v = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    bn_v = jnp.array([[3.0, 5.0, 0.5, 1.0]])
    assert fused['kernel'].dtype == jnp.float64
    assert helpers.relative_error(bn_v @ fc1['kernel'] + fc1['bias'],
                                  v @ fused['kernel'] + fused['bias']) <= 1e-10
    assert helpers.relative_error(2 * fc1['kernel'][:2], fused['kernel'][:2]) <= 1e-10


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_deploy_matches_training_form_float32(name):
  block = _block(CONFIGS[name])
  x, variables = _variables(block)
  y, y_deploy, deploy_vars = _train_and_deploy_outputs(block, variables, x)
  expected = {'fc3', 'fc3_bias'} | ({'fc1_fc2'} if block.has_global_perceptron else set())
  assert set(deploy_vars['params']) == expected
  assert y.shape == (3, block.H, block.W, block.out_channels)
  # Bound: 8x the training form's own float32 rounding on x (against itself in float64,
  # tests/rounding.py); both forms compute one function, so they differ by about twice that.
  # Measured on these blocks: rounding up to 1.5e-7 (floor: one ulp, 1.2e-7), so bounds of
  # 9.5e-7 .. 1.2e-6; train vs deploy 1.0e-7 .. 2.6e-7.
  tolerance = rounding.flax_tolerance(block, variables, x, float32_output=y)
  err = helpers.relative_error(y, y_deploy)
  assert err <= tolerance, (err, tolerance)


@pytest.mark.parametrize('name', ['kernels1357-C<O', 'C!=O-rectangular', 'one-partition-no-gp'])
def test_deploy_matches_training_form_float64(name):
  with jax.enable_x64(True):
    block = _block(CONFIGS[name], dtype=jnp.float64)
    x, variables = _variables(block, seed=4, dtype=jnp.float64)
    y, y_deploy, _ = _train_and_deploy_outputs(block, variables, x)
    assert y.dtype == jnp.float64
    assert helpers.relative_error(y, y_deploy) <= 1e-10


def test_every_perceptron_matters():
  # Guards the equivalence tests: changing any branch's BN changes the output.
  block = _block(CONFIGS['grid2x2-reduction2'])
  x, variables = _variables(block)
  apply = jax.jit(block.apply)
  y = apply(variables, x)
  for path in (('avg', 'bn'), ('fc3_bn',), ('repconv3', 'bn')):
    params = jax.tree.map(lambda a: a, variables['params'])
    node = params
    for name in path:
      node = node[name]
    node['bias'] = node['bias'] + 1.0
    assert not np.allclose(y, apply({**variables, 'params': params}, x), atol=1e-3), path


def _torch_block_to_flax(tb, block):
  """The reference block's weights in this project's layout, written out by hand."""
  sd = {k: v.detach().numpy().astype(np.float64) for k, v in tb.state_dict().items()}
  g, hw = block.fc3_groups, block.h * block.w
  bn = lambda p: ({'scale': sd[f'{p}.weight'], 'bias': sd[f'{p}.bias']},
                  {'mean': sd[f'{p}.running_mean'], 'var': sd[f'{p}.running_var']})
  params, stats = {}, {}
  if block.has_global_perceptron:
    params['fc1_fc2'] = {f: {'kernel': sd[f'fc1_fc2.{f}.weight'].T, 'bias': sd[f'fc1_fc2.{f}.bias']}
                         for f in ('fc1', 'fc2')}
    p_bn, s_bn = bn('avg.bn')
    params['avg'], stats['avg'] = {'bn': p_bn}, {'bn': s_bn}
  fc3 = sd['fc3.weight'][:, :, 0, 0]  # (O*h*w, C/g*h*w)
  params['fc3'] = fc3.reshape(g, block.out_channels // g * hw, -1).transpose(0, 2, 1)
  params['fc3_bn'], stats['fc3_bn'] = bn('fc3_bn')
  for k in block.reparam_conv_k:
    name = f'repconv{k}'
    p_bn, s_bn = bn(f'{name}.bn')
    params[name] = {'conv': {'kernel': sd[f'{name}.conv.weight'].transpose(2, 3, 1, 0)}, 'bn': p_bn}
    stats[name] = {'bn': s_bn}
  return {'params': params, 'batch_stats': stats}


@pytest.mark.parametrize('name', ['C!=O-rectangular', 'kernels1357-C<O', 'one-partition-no-gp'])
def test_matches_the_pytorch_reference_and_its_deploy_conversion(name):
  c, o, big_h, big_w, h, w, k, r, g = CONFIGS[name]
  torch.manual_seed(0)
  tb = tr.randomize_bn_(tr.RepMLP(c, o, big_h, big_w, h, w, k, r, g), seed=2).double().eval()
  x = torch.randn(2, c, big_h, big_w, dtype=torch.float64)
  with torch.no_grad():
    expected = tb(x).numpy().transpose(0, 2, 3, 1)
    official_deploy = {k: v.numpy() for k, v in tb.fused_state_dict().items()}
  with jax.enable_x64(True):
    block = _block(CONFIGS[name], dtype=jnp.float64)
    variables = _torch_block_to_flax(tb, block)
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    y, y_deploy, deploy_vars = _train_and_deploy_outputs(block, variables, x_nhwc)
    assert helpers.relative_error(expected, y) <= 1e-10
    assert helpers.relative_error(expected, y_deploy) <= 1e-10
    ours = jax.tree.map(np.asarray, deploy_vars['params'])
  hw = h * w
  np.testing.assert_allclose(ours['fc3'].transpose(0, 2, 1).reshape(o * hw, c // g * hw),
                             official_deploy['fc3.weight'][:, :, 0, 0], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ours['fc3_bias'], official_deploy['fc3.bias'], rtol=1e-10, atol=1e-12)
  if block.has_global_perceptron:
    np.testing.assert_allclose(ours['fc1_fc2']['fc1']['kernel'].T,
                               official_deploy['fc1_fc2.fc1.weight'], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours['fc1_fc2']['fc1']['bias'],
                               official_deploy['fc1_fc2.fc1.bias'], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('config, message', [
    ((4, 4, 8, 8, 3, 3, (1,), 1, 2), 'does not split into 3x3 partitions'),
    ((6, 4, 8, 8, 4, 4, (1,), 1, 4), r'multiples of fc3_groups \(4\)'),
    ((4, 4, 8, 8, 4, 4, (1, 2), 1, 2), r'must be odd'),
])
def test_bad_settings_are_refused(config, message):
  block = _block(config)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(block.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, config[0]),
                                                                        jnp.float32))


def test_wrong_input_shape_is_refused():
  block = _block(CONFIGS['grid2x2-reduction2'])
  with pytest.raises(ValueError, match=r'built for \(N, 8, 8, 4\) inputs'):
    jax.eval_shape(block.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 8, 4), jnp.float32))
