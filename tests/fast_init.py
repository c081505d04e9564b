"""Random variables for a model without running its init (XLA compiles of many random ops are slow).

Shapes come from `jax.eval_shape(model.init)`; values from numpy: kernels ~ N(0, 1/fan_in) with
fan_in the product of all but the last axis, other params ~ N(0, 0.1), BatchNorms far from
identity (helpers.randomize_batch_norm). Enough for equivalence and golden tests.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests import helpers


def random_variables(model, x_shape, seed: int = 0, dtype=jnp.float32):
  """Variables of `model` for inputs of `x_shape`, drawn with numpy, in `dtype`."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, dtype))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if leaf.ndim >= 2:
      value = rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(value, dtype)

  return helpers.randomize_batch_norm(jax.tree.map(draw, abstract), seed)
