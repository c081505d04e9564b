"""Structural re-parameterization: the helpers by hand, and train form == deploy form."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repmlp_jax
from repmlp_jax.models import layers
from repmlp_jax import model_io
from repmlp_jax.reparameterize import fusion as rp
from repmlp_jax.reparameterize import deploy as rp_deploy
from tests import fast_init
from tests import helpers

TINY = '_RepMLPNet-Tiny'
# The tiny variant with these random variables in float32 against itself in float64: 7.8e-8
# relative (logits; both forms). Two float32 forms of one function may differ by about twice
# that; the bound is 8x the rounding (tests/rounding.py's factor).
TINY_FLOAT32_BOUND = 8 * 1e-7


def test_bn_scale_shift_by_hand():
  params = {'scale': jnp.array([2.0, 1.0]), 'bias': jnp.array([1.0, -1.0])}
  stats = {'mean': jnp.array([3.0, 0.5]), 'var': jnp.array([4.0 - 1e-5, 1.0 - 1e-5])}
  scale, shift = rp.bn_scale_shift(params, stats)
  np.testing.assert_allclose(scale, [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(shift, [1.0 - 3.0, -1.0 - 0.5], rtol=1e-6)
  kernel, bias = rp.fuse_bn(jnp.ones((1, 1, 3, 2)) * jnp.array([1.0, 2.0]), params, stats)
  np.testing.assert_allclose(kernel[0, 0, 0], [1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(bias, [-2.0, -1.5], rtol=1e-6)


def test_pad_kernel_centres_the_kernel():
  k = jnp.arange(9.0).reshape(3, 3, 1, 1)
  padded = rp.pad_kernel(k, 5)
  assert padded.shape == (5, 5, 1, 1)
  np.testing.assert_array_equal(padded[1:4, 1:4], k)
  assert float(jnp.abs(padded).sum()) == float(k.sum())


def test_conv_to_fc_by_hand():
  # 1x1 kernel of value 3 on a 2x2 map: the FC is 3 * identity.
  fc = rp.conv_to_fc(jnp.full((1, 1, 1, 1), 3.0), 2, 2)
  np.testing.assert_array_equal(fc[0], 3.0 * np.eye(4))
  # 3x3 kernel with only the right neighbour set: output (y, x) reads input (y, x + 1).
  k = jnp.zeros((3, 3, 1, 1)).at[1, 2].set(1.0)
  fc = np.asarray(rp.conv_to_fc(k, 2, 2)[0])  # (in, out)
  expected = np.zeros((4, 4))
  expected[1, 0] = expected[3, 2] = 1.0  # in (0,1) -> out (0,0); in (1,1) -> out (1,0)
  np.testing.assert_array_equal(fc, expected)


def test_conv_to_fc_matches_the_convolution_on_random_maps():
  h, w, s, k = 3, 5, 4, 3
  kernel = jax.random.normal(jax.random.key(0), (k, k, 1, s))
  x = jax.random.normal(jax.random.key(1), (6, h, w, s))
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=s, precision='highest')
  fc = rp.conv_to_fc(kernel, h, w)  # (S, hw, hw)
  via_fc = jnp.einsum('nps,spq->nqs', x.reshape(6, h * w, s), fc, precision='highest')
  np.testing.assert_allclose(via_fc.reshape(conv.shape), conv, atol=1e-5)


def test_reassemble_matches_a_hand_computed_case():
  # N=1, C=2, S=1, H=W=2, windows 1x1: four windows, two rows each. x[c, i, j] = 100c + 10i + j.
  x_nchw = np.array([[[0, 1], [10, 11]], [[100, 101], [110, 111]]], np.float32)
  x = jnp.asarray(x_nchw.transpose(1, 2, 0))[None]  # NHWC
  out = np.asarray(layers.reassemble(layers.partition(x, 1, 1, 1)))[0].transpose(2, 0, 1)
  # Rows in order (i, j, r) are read back as (r', i', j'): the official permutation.
  expected = np.array([[[0, 100], [1, 101]], [[10, 110], [11, 111]]], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_reassemble_is_the_inverse_with_one_window_or_one_row_per_window():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
  for h, s in ((4, 2), (2, 6)):  # one window; C == S
    np.testing.assert_array_equal(layers.reassemble(layers.partition(x, h, h, s)), x)
  assert not np.array_equal(layers.reassemble(layers.partition(x, 2, 2, 2)), x)


def _tiny_variables(model, seed=0, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(seed + 1), (2, 32, 32, 3), dtype)
  return x, fast_init.random_variables(model, x.shape, seed, dtype)


def _randomize(variables, seed):
  return helpers.randomize_batch_norm(variables, seed)


def test_deploy_model_init_matches_reparam_structure():
  model = repmlp_jax.create_model(TINY)
  deploy_model = model.clone(deploy=True)
  deploy_vars = jax.eval_shape(functools.partial(rp_deploy.reparam_variables, model),
                               model_io.abstract_variables(model))
  expected = model_io.abstract_variables(deploy_model)
  chex.assert_trees_all_equal_shapes(deploy_vars, expected)
  block = expected['params']['stages_1_0']['repmlp_block']
  assert set(block) == {'gp', 'fc3', 'fc3_bias'}
  assert 'bn' not in expected['params']['conv_embedding']


def test_reparam_equivalence_float32():
  model = repmlp_jax.create_model(TINY, num_classes=10)
  x, variables = _tiny_variables(model)
  deploy_model, deploy_vars = repmlp_jax.reparam(model, variables)
  y_train = jax.jit(model.apply)(variables, x)
  err = helpers.relative_error(y_train, jax.jit(deploy_model.apply)(deploy_vars, x))
  assert err <= TINY_FLOAT32_BOUND, err


def test_reparam_equivalence_float64():
  with jax.enable_x64(True):
    model = repmlp_jax.create_model(TINY, num_classes=10, dtype=jnp.float64,
                                    reparam_conv_k=(1, 3, 5))
    x, variables = _tiny_variables(model, seed=3, dtype=jnp.float64)
    deploy_model, deploy_vars = repmlp_jax.reparam(model, variables)
    y_train = jax.jit(model.apply)(variables, x)
    y_deploy = jax.jit(deploy_model.apply)(deploy_vars, x)
    assert y_train.dtype == jnp.float64
    assert helpers.relative_error(y_train, y_deploy) <= 1e-10


def test_reparam_refuses_variables_of_another_model():
  model = repmlp_jax.create_model(TINY, num_classes=10)
  _, variables = _tiny_variables(model.clone(num_classes=7))
  with pytest.raises(ValueError, match=r"do not fit this RepMLPNet.*'params/head/bias'"):
    repmlp_jax.reparam(model, variables)  # Would give a 7-class head to a 10-class model.


def test_reparam_is_pure_and_jittable():
  model = repmlp_jax.create_model(TINY, num_classes=10)
  x, variables = _tiny_variables(model, seed=7)
  snapshot = jax.tree.map(np.array, variables)
  eager = repmlp_jax.reparam_variables(model, variables)
  jitted = jax.jit(functools.partial(repmlp_jax.reparam_variables, model))(variables)
  chex.assert_trees_all_equal(snapshot, variables)  # input untouched
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)
  deploy_model = model.clone(deploy=True)
  y_train = jax.jit(model.apply)(variables, x)
  err = helpers.relative_error(y_train, jax.jit(deploy_model.apply)(jitted, x))
  assert err <= TINY_FLOAT32_BOUND, err


def test_reparam_refuses_a_deploy_model():
  model = repmlp_jax.create_model(TINY, deploy=True)
  with pytest.raises(ValueError, match='already deploy'):
    repmlp_jax.reparam(model, {})


def test_block_gate_and_branches_matter():
  # Guards against a test that cannot fail: the deploy form of another block's weights differs.
  model = repmlp_jax.create_model(TINY, num_classes=10)
  x, variables = _tiny_variables(model)
  _, dv1 = repmlp_jax.reparam(model, variables)
  _, dv2 = repmlp_jax.reparam(model, _randomize(variables, 99))
  a = dv1['params']['stages_0_0']['repmlp_block']['fc3']
  b = dv2['params']['stages_0_0']['repmlp_block']['fc3']
  assert not np.allclose(a, b)
