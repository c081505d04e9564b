"""Units traced once per distinct shape (jit_units, the default) compute bit for bit what units
called in place compute, and flax's inspection tools still see inside every unit."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import repmlp_jax
from tests import fast_init

TINY = '_RepMLPNet-Tiny'


def _everything(model, variables, x):
  """Eval and train outputs, new BN statistics, and the gradients of params and input."""
  evaluated = model.apply(variables, x)

  def loss(params, x):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'])
    return jnp.sum(logits ** 2), (logits, updates['batch_stats'])

  grads, (trained, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
  return evaluated, trained, stats, grads


def test_jitted_units_equal_units_called_in_place_bit_for_bit():
  # Two stages of the tiny variant, the second with two units of one shape.
  jitted = repmlp_jax.create_model(TINY, num_classes=5, channels=(8, 16), depths=(1, 2),
                                   partitions=(4, 2), sharesets=(2, 4))
  assert jitted.jit_units
  in_place = jitted.clone(jit_units=False)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
  variables = fast_init.random_variables(in_place, x.shape, seed=0)
  expected = jax.jit(functools.partial(_everything, in_place))(variables, x)
  got = jax.jit(functools.partial(_everything, jitted))(variables, x)
  # Three unit calls, two traces: stage 2's two units share one.
  calls = [e.params['jaxpr'] for e in jax.make_jaxpr(jitted.apply)(variables, x).eqns
           if e.params.get('name') == '_apply_unit']
  assert len(calls) == 3 and len({id(j) for j in calls}) == 2
  assert jax.tree.structure(got) == jax.tree.structure(expected)  # Same names, stats included.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def test_interceptors_and_captured_intermediates_see_inside_every_unit():
  model = repmlp_jax.create_model(TINY, num_classes=5)
  x = jnp.ones((2, 32, 32, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  # Jitted: the choice is made while tracing, and eager applies are slow.
  _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                       mutable=['intermediates']))(variables, x)
  assert 'fc3_bn' in state['intermediates']['stages_2_1']['repmlp_block']
  seen = set()

  def record(next_fun, args, kwargs, context):
    seen.add('/'.join(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x)
  assert 'stages_2_1/ffn_block/ffn_fc2' in seen
