"""The numerical core against independent float64 truths, fast enough to run once per mutant.

The partition / re-assembly against the official reshapes on non-square maps (several windows
along each axis, hp != wp, C/S > 1); one RepMLPNet block (training form) against the PyTorch
reference block on such a map; the BatchNorm fusion against its formula, with variances small
enough for epsilon to matter; conv -> FC for grouped kernels on non-square maps; the exported
identity BatchNorm's fields; our reparam against the reference's deploy conversion. Float64 and
exact to <= 1e-12 (pure data movement: bit-exact), except where a float32 import rounds the
reference's result (one float32 ulp). tests/mutation/run.py runs these against planted bugs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax.models import layers
from repmlp_jax.models import factory
from repmlp_jax.pytorch import keys_repmlpnet as keys
from repmlp_jax.reparameterize import deploy as rp_deploy
from repmlp_jax.reparameterize import fusion
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr

EXACT = 1e-12  # float64 round-off of these small sums is ~1e-16.


def _official_partition(x_nchw, h, w, s):
  """The official code's rows: (N*hp*wp*C/S, S, h, w) (tests/torch_reference.py, forward)."""
  n, c, hh, ww = x_nchw.shape
  parts = x_nchw.reshape(n, c, hh // h, h, ww // w, w).transpose(0, 2, 4, 1, 3, 5)
  return parts.reshape(-1, s, h, w)


def _official_reassemble(rows, n, c, hh, ww):
  """The official re-assembly of a (N*hp*wp*C/S, S, h, w) buffer into (N, C, H, W)."""
  _, s, h, w = rows.shape
  out = rows.reshape(-1, hh // h, ww // w, s, h, w).transpose(0, 3, 1, 4, 2, 5)
  return out.reshape(n, c, hh, ww)


# (N, C, H, W, h, w, S): several windows per axis with hp != wp, C/S > 1; also hp = 1, wp > 1.
SHAPES = [(2, 6, 4, 6, 2, 2, 2), (1, 8, 3, 9, 3, 3, 4), (2, 4, 2, 8, 2, 2, 1)]


@pytest.mark.parametrize('shape', SHAPES)
def test_partition_is_the_official_row_layout(shape):
  n, c, hh, ww, h, w, s = shape
  x = np.random.default_rng(0).normal(size=(n, c, hh, ww)).astype(np.float32)
  rows = np.asarray(layers.partition(jnp.asarray(x.transpose(0, 2, 3, 1)), h, w, s))
  assert rows.shape == (n, hh // h, ww // w, c // s, h, w, s)
  # Ours (..., h, w, S) -> the official (..., S, h, w), rows in the same (n, i, j, r) order.
  ours = rows.reshape(-1, h, w, s).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(ours, _official_partition(x, h, w, s))


@pytest.mark.parametrize('shape', SHAPES)
def test_reassemble_is_the_official_permutation(shape):
  n, c, hh, ww, h, w, s = shape
  # Any buffer, not one that came from `partition`: the re-assembly alone is checked.
  official_rows = np.random.default_rng(1).normal(
      size=(n * c * hh * ww // (h * w * s), s, h, w)).astype(np.float32)
  rows = official_rows.transpose(0, 2, 3, 1).reshape(n, hh // h, ww // w, c // s, h, w, s)
  ours = np.asarray(layers.reassemble(jnp.asarray(rows))).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(ours, _official_reassemble(official_rows, n, c, hh, ww))


def _block_variables(sd, kernels):
  """A reference block's state_dict -> the Flax RepMLPBlock's variables (float64)."""
  a = lambda k: np.asarray(sd[k].detach().numpy(), np.float64)  # noqa: E731
  s_hw, hw = a('fc3.weight').shape[:2]
  bn = lambda p: ({'scale': a(f'{p}.weight'), 'bias': a(f'{p}.bias')},  # noqa: E731
                  {'mean': a(f'{p}.running_mean'), 'var': a(f'{p}.running_var')})
  params = {'gp': {f: {'kernel': a(f'gp.{f}.weight')[:, :, 0, 0].T, 'bias': a(f'gp.{f}.bias')}
                   for f in ('fc1', 'fc2')},
            'fc3': a('fc3.weight')[:, :, 0, 0].reshape(s_hw // hw, hw, hw).transpose(0, 2, 1)}
  params['fc3_bn'], fc3_stats = bn('fc3_bn')
  stats = {'fc3_bn': fc3_stats}
  for k in kernels:
    bn_params, bn_stats = bn(f'repconv{k}.bn')
    params[f'repconv{k}'] = {'conv': {'kernel': a(f'repconv{k}.conv.weight').transpose(2, 3, 1, 0)},
                             'bn': bn_params}
    stats[f'repconv{k}'] = {'bn': bn_stats}
  return {'params': params, 'batch_stats': stats}


@pytest.mark.parametrize('hw', [(4, 6), (6, 4)])
def test_block_matches_the_reference_block_on_non_square_maps_float64(hw):
  c, h, s, kernels = 8, 2, 2, (1, 3)
  torch.manual_seed(0)
  block = tr.randomize_bn_(tr.RepMLPBlock(c, h, h, s, kernels), seed=1).double().eval()
  x = torch.randn(2, c, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = block(x).numpy()
  with jax.enable_x64(True):
    module = layers.RepMLPBlock(c, h, h, s, kernels, dtype=jnp.float64, precision='highest')
    variables = _block_variables(block.state_dict(), kernels)
    y = module.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    got = np.asarray(y).transpose(0, 3, 1, 2)
  assert np.abs(got - expected).max() <= EXACT * np.abs(expected).max()


def test_bn_scale_shift_is_the_formula_where_epsilon_matters():
  rng = np.random.default_rng(0)
  gamma, beta, mean = rng.normal(size=(3, 5))
  var = np.array([1e-4, 1e-3, 0.0, 2.0, 1e-5])  # eps = 1e-5 is 10% of the first variance.
  with jax.enable_x64(True):
    scale, shift = fusion.bn_scale_shift(
        {'scale': jnp.asarray(gamma), 'bias': jnp.asarray(beta)},
        {'mean': jnp.asarray(mean), 'var': jnp.asarray(var)})
    kernel = rng.normal(size=(3, 3, 2, 5))
    fused_kernel, fused_bias = fusion.fuse_bn(jnp.asarray(kernel), {'scale': jnp.asarray(gamma),
                                                                    'bias': jnp.asarray(beta)},
                                              {'mean': jnp.asarray(mean), 'var': jnp.asarray(var)})
  t = gamma / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(scale, t, rtol=EXACT, atol=0)
  np.testing.assert_allclose(shift, beta - mean * t, rtol=EXACT, atol=EXACT)
  np.testing.assert_allclose(fused_kernel, kernel * t, rtol=EXACT, atol=0)
  np.testing.assert_allclose(fused_bias, beta - mean * t, rtol=EXACT, atol=EXACT)


@pytest.mark.parametrize('groups, cg, og, k, h, w', [(2, 3, 2, 3, 3, 4), (1, 2, 3, 5, 4, 2),
                                                      (4, 1, 1, 3, 2, 5)])
def test_conv_to_fc_equals_the_grouped_convolution_float64(groups, cg, og, k, h, w):
  rng = np.random.default_rng(k + h)
  kernel = rng.normal(size=(k, k, cg, groups * og))
  x = rng.normal(size=(3, h, w, groups * cg))
  with jax.enable_x64(True):
    conv = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(kernel), (1, 1),
                                        [(k // 2, k // 2)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups, precision='highest')
    fc = np.asarray(fusion.conv_to_fc(jnp.asarray(kernel), h, w, groups=groups))
  assert fc.shape == (groups, cg * h * w, og * h * w)
  # Inputs and outputs flattened channel-major (c, y, x) within each group.
  rows = x.reshape(3, h, w, groups, cg).transpose(0, 3, 4, 1, 2).reshape(3, groups, cg * h * w)
  via_fc = np.einsum('ngp,gpq->ngq', rows, fc).reshape(3, groups, og, h, w)
  expected = np.asarray(conv).reshape(3, h, w, groups, og).transpose(0, 3, 4, 1, 2)
  np.testing.assert_allclose(via_fc, expected, rtol=0, atol=EXACT * np.abs(expected).max())


def test_pad_kernel_places_the_kernel_at_the_centre():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)
  padded = np.array(fusion.pad_kernel(jnp.asarray(kernel), 7))
  assert padded.shape == (7, 7, 2, 4)
  np.testing.assert_array_equal(padded[2:5, 2:5], kernel)
  padded[2:5, 2:5] = 0
  assert not padded.any()


def test_exported_identity_batch_norm_fields_are_exact():
  """A deploy-form conv with bias exports as conv + BatchNorm(1, bias, 0, 1 - eps)."""
  model = factory.create_model('_RepMLPNet-Tiny', num_classes=10, deploy=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  sd = keys.variables_to_torch(variables, model)
  identity_var = np.float32(1.0 - 1e-5)  # PyTorch's BN then computes x * 1 / sqrt(1) + bias.
  for prefix, path in (('conv_embedding', ('conv_embedding',)), ('embeds.1', ('embeds_1',)),
                       ('stages.2.1.ffn_block.ffn_fc2', ('stages_2_1', 'ffn_block', 'ffn_fc2'))):
    conv = variables['params']
    for name in path:
      conv = conv[name]
    conv = conv['conv']
    bias = np.asarray(conv['bias'])
    np.testing.assert_array_equal(sd[f'{prefix}.conv.weight'],
                                  np.asarray(conv['kernel']).transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd[f'{prefix}.bn.weight'], np.ones_like(bias))
    np.testing.assert_array_equal(sd[f'{prefix}.bn.bias'], bias)
    np.testing.assert_array_equal(sd[f'{prefix}.bn.running_mean'], np.zeros_like(bias))
    np.testing.assert_array_equal(sd[f'{prefix}.bn.running_var'],
                                  np.full_like(bias, identity_var))
    assert sd[f'{prefix}.bn.running_var'].dtype == np.float32
    assert sd[f'{prefix}.bn.num_batches_tracked'] == 0


def test_reparam_equals_the_reference_deploy_conversion():
  """Our reparam of the tiny model == the authors' conversion (float64), as imported here."""
  torch_model = tc.tiny_torch_model(seed=5, reparam_conv_k=(1, 3, 5)).double()
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  _, expected = repmlp_jax.load_torch(tr.deploy_state_dict(torch_model))  # float32 of float64.
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    ours = jax.device_get(rp_deploy.reparam_variables(model, variables64))
  assert jax.tree.structure(ours) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(ours)):
    # The import rounds the reference's float64 result to float32: one ulp of the array's scale.
    scale = np.abs(a).max()
    assert np.abs(np.asarray(b, np.float64) - a).max() <= 2 * rounding.FLOAT32_EPS * scale, (
        jax.tree_util.keystr(path))


def test_reparam_refuses_models_it_has_no_rule_for():
  with pytest.raises(TypeError, match='not a registered model family'):
    rp_deploy.reparam_variables(layers.RepMLPBlock(8, 2, 2, 2), {})
