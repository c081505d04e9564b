"""flax's inspection tools (method interceptors, capture_intermediates) see inside every unit."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import repmlp_jax

TINY = '_RepMLPNet-Tiny'


def test_interceptors_and_captured_intermediates_see_inside_every_unit():
  model = repmlp_jax.create_model(TINY, num_classes=5)
  x = jnp.ones((2, 32, 32, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  # Jitted: eager applies are slow.
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
