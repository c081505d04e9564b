"""The matmul / shifted-sum forms of convolutions equal flax's nn.Conv with the same variables."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repmlp_jax.models import layers


@pytest.mark.parametrize('k, channels', [(1, 1), (3, 1), (3, 4), (5, 3)])
def test_depthwise_conv_equals_grouped_nn_conv(k, channels):
  x = jax.random.normal(jax.random.key(0), (3, 6, 5, channels))
  ours = layers.DepthwiseConv(k)
  ref = nn.Conv(channels, (k, k), padding=[(k // 2, k // 2)] * 2, feature_group_count=channels)
  variables = ref.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # a non-zero bias too
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k, channels', [(1, 2), (3, 4), (5, 3)])
def test_depthwise_conv_gradients_equal_grouped_nn_conv(k, channels):
  """The written-out gradient (input, kernel, bias) against autodiff of nn.Conv, in float64."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, channels), jnp.float64)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    ref = nn.Conv(channels, (k, k), padding=[(k // 2, k // 2)] * 2, feature_group_count=channels,
                  dtype=jnp.float64, param_dtype=jnp.float64)
    variables = jax.tree.map(lambda a: a + 0.1, ref.init(jax.random.key(1), x))
    ours = layers.DepthwiseConv(k, dtype=jnp.float64)

    def grads(module):
      # The kernel's cast to the compute dtype is part of the module; float64 keeps it exact.
      return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * cotangent),
                      argnums=(0, 1))(variables, x)

    got, want = grads(ours), grads(ref)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_bn_uses_the_fast_forms_with_nn_conv_variables():
  x = jnp.ones((1, 8, 8, 4))
  for module in (layers.ConvBN(4, 3, padding=1, groups=4), layers.ConvBN(6, 2, strides=2),
                 layers.ConvBN(6, 3, padding=1), layers.ConvBN(6, 1)):
    ref = nn.Conv(module.features, (module.kernel_size,) * 2, strides=module.strides,
                  padding=[(module.padding,) * 2] * 2, feature_group_count=module.groups,
                  use_bias=False)
    got = jax.eval_shape(module.init, jax.random.key(0), x)['params']['conv']
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(
        jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), x)['params'])


@pytest.mark.parametrize('in_split, split', [(None, None), (2, None), (2, 3), (None, 3)])
def test_pointwise_conv_equals_nn_conv(in_split, split):
  """One dot over the channels, held as C or as (C / S, S) on either side, equals a 1x1 nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  ref = nn.Conv(6, (1, 1))
  variables = jax.tree.map(lambda a: a + 0.1, ref.init(jax.random.key(1), x))
  ours = layers.PointwiseConv(6, split=split)
  x_in = x if in_split is None else layers.split_channels(x, in_split)
  got = ours.apply(variables, x_in)
  assert got.shape == (2, 3, 5) + ((6,) if split is None else (2, 3))
  np.testing.assert_allclose(got.reshape(2, 3, 5, 6), ref.apply(variables, x), rtol=1e-5,
                             atol=1e-5)


def test_split_channels_merges_the_spatial_axes_in_row_major_order():
  x = jnp.arange(2 * 3 * 5 * 8).reshape(2, 3, 5, 8)
  merged = layers.split_channels(x, 4, merge_spatial=True)
  assert merged.shape == (2, 15, 1, 2, 4)
  np.testing.assert_array_equal(merged[:, 1 * 5 + 2, 0, 1, 3], x[:, 1, 2, 1 * 4 + 3])
