"""Layouts XLA should not have to materialize in the RepMLP block's optimized HLO."""

import re

import jax
import jax.numpy as jnp
import pytest

from repmlp_jax.models import layers


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
