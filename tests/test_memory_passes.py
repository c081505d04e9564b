"""Fewer memory passes: layouts XLA need not materialize, BatchNorms folded in the deploy form."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repmlp_jax.models import layers
from repmlp_jax.reparameterize import fusion


@pytest.mark.parametrize('deploy', [False, True])
def test_one_shareset_fc3_kernel_is_not_copied(deploy):
  # With one shareset fc3 is a plain (h*w, h*w) matmul; written as a batched one, XLA:CPU
  # transposed the whole kernel on every call (3136^2 floats per 56 x 56 block of B224).
  block = layers.RepMLPBlock(8, 16, 16, 1, deploy=deploy)
  x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
  variables = jax.eval_shape(block.init, jax.random.key(0), x)
  hlo = jax.jit(lambda v, x: block.apply(v, x)).lower(variables, x).compile().as_text()
  kernel_shaped = re.compile(r'= f32\[(1,)?256,256\]\S* (transpose|copy|fusion)\(')
  assert not [line for line in hlo.splitlines() if kernel_shaped.search(line)]


def test_fuse_bn_before_by_hand():
  # BN(x) = x * s + t with s = gamma / sqrt(var + eps), t = beta - mean * s; then x' @ K + b.
  kernel = jnp.array([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, I=2, O=2)
  bias = jnp.array([0.5, -0.5])
  bn_params = {'scale': jnp.array([2.0, 3.0]), 'bias': jnp.array([1.0, -1.0])}
  bn_stats = {'mean': jnp.array([0.5, 2.0]), 'var': jnp.array([4.0, 9.0]) - layers.BN_EPSILON}
  # s = (1, 1), t = (0.5, -3): kernel unchanged, bias + t @ K = (0.5 + 0.5 - 9, -0.5 + 1 - 12).
  got_kernel, got_bias = fusion.fuse_bn_before(kernel, bias, bn_params, bn_stats)
  np.testing.assert_allclose(got_kernel, kernel, rtol=1e-6)
  np.testing.assert_allclose(got_bias, [-8.0, -11.5], rtol=1e-6)
  with pytest.raises(ValueError, match='1x1'):
    fusion.fuse_bn_before(jnp.ones((3, 3, 2, 2)), bias, bn_params, bn_stats)
