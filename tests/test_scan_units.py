"""Each stage's units as one lax.scan (scan_units=True) compute what one call per unit
computes: outputs, BatchNorm statistics, gradients and the deploy form, in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import repmlp_jax
from tests import helpers


def _everything(model, variables, x):
  """Eval and train outputs, new BN statistics, gradients and deploy output of `model`."""
  evaluated = model.apply(variables, x)
  trained, stats = model.apply(variables, x, train=True, mutable=['batch_stats'])

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits ** 2)

  deploy = model.clone(deploy=True).apply(repmlp_jax.reparam_variables(model, variables), x)
  return evaluated, trained, stats, jax.grad(loss)(variables['params']), deploy


def test_scanned_units_equal_unit_by_unit_calls():
  with jax.enable_x64(True):
    scanned = repmlp_jax.create_model('_RepMLPNet-Tiny', num_classes=5, dtype=jnp.float64,
                                      depths=(2, 1, 3, 1), scan_units=True)
    unrolled = scanned.clone(scan_units=False)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float64)
    variables = jax.jit(unrolled.init)(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                             helpers.randomize_batch_norm(variables))
    expected = jax.jit(functools.partial(_everything, unrolled))(variables, x)
    got = jax.jit(functools.partial(_everything, scanned))(variables, x)
  assert jax.tree.structure(got) == jax.tree.structure(expected)  # Same names, stats included.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    scale = max(float(np.max(np.abs(a))), 1.0)
    assert float(np.max(np.abs(a - b))) <= 1e-10 * scale, jax.tree_util.keystr(path)
