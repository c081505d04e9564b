"""The package's BatchNorm: flax's variables, PyTorch's statistics, groups of images.

Against torch.nn.BatchNorm2d in float64 (one module per group, as one per GPU under DDP) to
1e-12; evaluation mode bit for bit equal to flax's nn.BatchNorm; float32 statistics under
bfloat16 compute; groups under jit, inside lax.scan and sharded over the 8 simulated devices;
every model family builds its BatchNorms through layers.batch_norm and groups whole images.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import repmlp_jax
from repmlp_jax.models import batch_norm
from repmlp_jax.models import layers
from repmlp_jax.train import sharding
from tests import fast_init
from tests import helpers


def _x(shape, seed=0, offset=1.0):
  return np.random.default_rng(seed).normal(size=shape) * 2.0 + offset


def _variables(channels, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {'params': {'scale': rng.uniform(0.5, 1.5, channels).astype(dtype),
                     'bias': rng.normal(size=channels).astype(dtype)},
          'batch_stats': {'mean': rng.normal(size=channels).astype(dtype),
                          'var': rng.uniform(0.5, 2.0, channels).astype(dtype)}}


def _train(variables, x, batch_size, group_size, dtype=None):
  """Training-mode BatchNorm built by layers.batch_norm, groups of `group_size` images."""
  module = layers.batch_norm(True, dtype or x.dtype,
                             groups=batch_norm.num_groups(batch_size, group_size))
  return module.apply(variables, x, mutable=['batch_stats'])


def test_variables_are_those_of_flax_batch_norm():
  x = jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.bfloat16)
  ours = jax.eval_shape(layers.batch_norm(True, jnp.bfloat16).init, jax.random.key(0), x)
  flax_bn = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  theirs = jax.eval_shape(flax_bn.init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), theirs)
  initial = layers.batch_norm(False, jnp.float32).init(jax.random.key(0), jnp.ones((2, 3)))
  jax.tree.map(np.testing.assert_array_equal, initial,
               nn.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones((2, 3))))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_eval_mode_is_exactly_flax_eval_mode(dtype):
  variables = _variables(5)
  x = jnp.asarray(_x((3, 4, 4, 5)), dtype)
  ours = jax.jit(layers.batch_norm(False, dtype).apply)(variables, x)
  flax_bn = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype)
  np.testing.assert_array_equal(ours, jax.jit(flax_bn.apply)(variables, x))
  assert ours.dtype == dtype


def test_train_mode_normalizes_as_flax_and_updates_the_variance_as_pytorch():
  variables = _variables(5)
  x = jnp.asarray(_x((4, 3, 2, 5)), jnp.float32)
  y, updates = _train(variables, x, 4, 0)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  y_flax, flax_updates = flax_bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_flax, rtol=1e-6, atol=1e-6)
  stats, flax_stats, old = updates['batch_stats'], flax_updates['batch_stats'], variables[
      'batch_stats']
  np.testing.assert_allclose(stats['mean'], flax_stats['mean'], rtol=1e-6)
  n = 4 * 3 * 2  # Values per channel: the variance is unbiased with n / (n - 1).
  biased = (flax_stats['var'] - 0.9 * old['var']) / 0.1
  np.testing.assert_allclose(stats['var'], 0.9 * old['var'] + 0.1 * biased * n / (n - 1),
                             rtol=1e-5)


@pytest.mark.parametrize('group_size', [0, 8, 4, 2])
@pytest.mark.parametrize('rows_per_image', [1, 3])
def test_groups_equal_one_pytorch_batch_norm_per_group(group_size, rows_per_image):
  """rows_per_image 3: the leading axis holds several rows per image (windows, partitions)."""
  with jax.enable_x64(True):
    batch, channels = 8, 3
    x = _x((batch * rows_per_image, 5, 4, channels))
    variables = _variables(channels, dtype=np.float64)
    y, updates = _train(variables, jnp.asarray(x), batch, group_size)
  groups = batch // group_size if group_size else 1
  torch_bns = []
  outputs = []
  for xg in np.split(x, groups):
    bn = torch.nn.BatchNorm2d(channels).double().train()
    with torch.no_grad():
      for name, value in (('weight', variables['params']['scale']),
                          ('bias', variables['params']['bias']),
                          ('running_mean', variables['batch_stats']['mean']),
                          ('running_var', variables['batch_stats']['var'])):
        getattr(bn, name).copy_(torch.from_numpy(value))
      outputs.append(bn(torch.from_numpy(xg.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1))
    torch_bns.append(bn)
  assert helpers.relative_error(np.concatenate(outputs), y) <= 1e-12
  for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
    mean_over_groups = np.mean([getattr(bn, theirs).numpy() for bn in torch_bns], axis=0)
    assert helpers.relative_error(mean_over_groups, updates['batch_stats'][ours]) <= 1e-12


@pytest.mark.parametrize('group_size', [0, 2])
def test_gradients_equal_pytorch_autograd_per_group(group_size):
  """The written-out backward (input, scale, bias) against torch autograd, float64, 1e-12."""
  batch, channels = 4, 3
  x = _x((batch * 3, 5, 4, channels))
  cotangent = np.random.default_rng(1).normal(size=x.shape)
  variables = _variables(channels, dtype=np.float64)
  with jax.enable_x64(True):
    def loss(params, x):
      y, _ = _train({'params': params, 'batch_stats': variables['batch_stats']}, x, batch,
                    group_size)
      return jnp.sum(y * cotangent)
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(variables['params'], jnp.asarray(x))
  groups = batch // group_size if group_size else 1
  bn = torch.nn.BatchNorm2d(channels).double().train()
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(variables['params']['scale']))
    bn.bias.copy_(torch.from_numpy(variables['params']['bias']))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  y = torch.cat([bn(xg) for xg in torch.chunk(xt, groups)])
  (y * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  assert helpers.relative_error(xt.grad.numpy().transpose(0, 2, 3, 1), g_x) <= 1e-12
  assert helpers.relative_error(bn.weight.grad.numpy(), g_params['scale']) <= 1e-12
  assert helpers.relative_error(bn.bias.grad.numpy(), g_params['bias']) <= 1e-12


@pytest.mark.parametrize('group_size', [0, 2])
def test_two_channel_axes_equal_one_batch_norm_over_the_merged_channels(group_size):
  """channel_axes=2 on (N, H, W, R, S): the BatchNorm of the R*S channels of the (N, H, W, R*S)
  view, channel r*S + s at [..., r, s]; outputs, statistics and gradients."""
  with jax.enable_x64(True):
    x = jnp.asarray(_x((4, 3, 2, 3, 5)))
    variables = _variables(15, dtype=np.float64)
    groups = batch_norm.num_groups(4, group_size)
    split = layers.batch_norm(True, jnp.float64, groups=groups, channel_axes=2)
    plain = layers.batch_norm(True, jnp.float64, groups=groups)

    def outputs(module, x, params):
      y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return y, updates['batch_stats']

    def view(params, x):  # The same BatchNorm on the (N, H, W, R*S) view.
      y, stats = outputs(plain, x.reshape(4, 3, 2, 15), params)
      return y.reshape(x.shape), stats

    cotangent = jnp.asarray(_x(x.shape, seed=3))
    got = jax.vjp(lambda p, x: outputs(split, x, p), variables['params'], x, has_aux=True)
    want = jax.vjp(view, variables['params'], x, has_aux=True)
    assert helpers.relative_error(want[0], got[0]) <= 1e-12
    for name in ('mean', 'var'):
      assert helpers.relative_error(want[2][name], got[2][name]) <= 1e-12
    for a, b in zip(jax.tree.leaves(want[1](cotangent)), jax.tree.leaves(got[1](cotangent))):
      assert helpers.relative_error(a, b) <= 1e-12
    eval_mode = layers.batch_norm(False, jnp.float64, channel_axes=2)
    assert helpers.relative_error(
        eval_mode.apply(variables, x),
        layers.batch_norm(False, jnp.float64).apply(variables, x.reshape(4, 3, 2, 15)
                                                    ).reshape(x.shape)) <= 1e-12


def test_bfloat16_compute_keeps_float32_statistics():
  x = jnp.asarray(_x((16, 4, 4, 8), offset=3.0), jnp.bfloat16)
  variables = _variables(8)
  y, updates = _train(variables, x, 16, 4, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(updates))
  # The same bfloat16 values reduced in float32: any bfloat16 reduction would be ~1e-2 off.
  _, reference = _train(variables, x.astype(jnp.float32), 16, 4, dtype=jnp.float32)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(updates['batch_stats'][name], reference['batch_stats'][name],
                               rtol=1e-6)


class _Unit(nn.Module):
  """Dense -> BatchNorm: a stand-in for a unit applied functionally inside lax.scan."""

  groups: int = 1

  @nn.compact
  def __call__(self, x, *, train):
    return layers.batch_norm(train, jnp.float32, name='bn', groups=self.groups)(
        nn.Dense(6, name='fc')(x))


def test_groups_apply_inside_lax_scan_under_jit():
  unit = _Unit()
  x = jnp.asarray(_x((8, 2, 2, 6)), jnp.float32)
  stacked = jax.vmap(lambda k: unit.init(k, x, train=False))(jax.random.split(jax.random.key(0),
                                                                              3))

  def scanned(stacked, x):
    def body(h, variables):
      h, updates = _Unit(groups=4).apply(variables, h, train=True, mutable=['batch_stats'])
      return h, updates['batch_stats']
    return jax.lax.scan(body, x, stacked)

  out, stats = jax.jit(scanned)(stacked, x)
  whole_batch = x  # One group: statistics over all 8 images.
  for i in range(3):
    variables = jax.tree.map(lambda a: a[i], stacked)
    whole_batch, _ = unit.apply(variables, whole_batch, train=True, mutable=['batch_stats'])
  # Each group of 2 images in a call of its own: what the scanned, grouped units must give.
  expected, expected_stats = x, []
  for i in range(3):
    variables = jax.tree.map(lambda a: a[i], stacked)
    parts = [unit.apply(variables, part, train=True, mutable=['batch_stats'])
             for part in jnp.split(expected, 4)]
    expected = jnp.concatenate([p[0] for p in parts])
    expected_stats.append(jax.tree.map(lambda *s: sum(s) / 4, *[p[1] for p in parts]))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for i, want in enumerate(expected_stats):
    got = jax.tree.map(lambda a: a[i], stats)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got,
                 want['batch_stats'])
  assert not np.allclose(out, whole_batch, atol=1e-3)  # The groups did change the result.


@pytest.mark.parametrize('group_size', [0, 4, 2, 1])
def test_sharded_groups_equal_unsharded(group_size):
  """16 images on 8 devices: groups of 4 span two devices, of 2 fill one, of 1 half of one."""
  assert jax.device_count() == 8
  x = jnp.asarray(_x((16, 4, 4, 8)), jnp.float32)
  variables = _variables(8)

  def step(variables, x):
    return _train(variables, x, 16, group_size)

  expected = jax.jit(step)(variables, x)
  mesh = sharding.create_mesh(jax.devices())
  sharded_x = jax.device_put(x, NamedSharding(mesh, P('data')))
  got = jax.jit(step)(variables, sharded_x)
  assert len(sharded_x.sharding.device_set) == 8
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), got,
               expected)


def test_bad_groups_fail_clearly():
  with pytest.raises(ValueError, match='bn_group_size=3 does not divide the batch of 8'):
    batch_norm.num_groups(8, 3)
  with pytest.raises(ValueError, match='must be >= 0'):
    batch_norm.num_groups(8, -1)
  with pytest.raises(ValueError, match='more than one value per channel'):
    _train(_variables(3), jnp.ones((4, 3)), 4, 1)  # One value per channel and group.
  model = repmlp_jax.create_model('_RepMLPNet-Tiny', num_classes=5)
  with pytest.raises(ValueError, match='bn_group_size=3 does not divide the batch of 4'):
    jax.eval_shape(functools.partial(model.apply, train=True, bn_group_size=3,
                                     mutable=['batch_stats']),
                   jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3))),
                   jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32))


def _batch_norm_count(model, x_shape):
  """Modules built during init: (our BatchNorms, flax nn.BatchNorms, BatchNorm stats).

  Counted once per module, however often it is called (RepMLPNet's prebn1 also normalizes the
  Global Perceptron's pooled input in eval mode).
  """
  built = {}

  def record(next_fun, args, kwargs, context):
    built[context.module.scope.path] = type(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct(x_shape, jnp.float32))
  stats = [p for p, _ in jax.tree_util.tree_leaves_with_path(abstract['batch_stats'])
           if jax.tree_util.keystr(p).endswith("['mean']")]
  built = list(built.values())
  return built.count(batch_norm.BatchNorm), built.count(nn.BatchNorm), len(stats)


@pytest.mark.parametrize('name, size', [('RepMLPNet-B224', 224), ('RepMLP-ResNet50-Light', 224),
                                        ('RepMLP-ResNet50-g8-16', 320), ('ResNet-50', 224),
                                        ('RepMLP-CIFAR-PureMLP', 32)])
def test_every_model_family_uses_the_package_batch_norm(name, size):
  ours, flax_bns, stats = _batch_norm_count(repmlp_jax.create_model(name), (1, size, size, 3))
  assert flax_bns == 0 and ours == stats > 0


@pytest.mark.parametrize('name, size, overrides', [
    ('_RepMLP-ResNet-Tiny', 64, {}),
    ('RepMLP-CIFAR-PureMLP', 32, dict(channels=(8, 8, 16), depths=(1, 1, 1))),
    ('_RepMLPNet-Tiny', 32, {}),
])
def test_grouped_forward_equals_one_forward_per_group(name, size, overrides):
  """Every BatchNorm of every family (windows, partition rows, one-window maps) groups whole
  images, given the group size when the model is called."""
  with jax.enable_x64(True):
    model = repmlp_jax.create_model(name, num_classes=5, dtype=jnp.float64, **overrides)
    x = jnp.asarray(_x((4, size, size, 3)))
    variables = fast_init.random_variables(model, x.shape, dtype=jnp.float64)

    @functools.partial(jax.jit, static_argnums=2)
    def forward(variables, x, group_size):
      return model.apply(variables, x, train=True, bn_group_size=group_size,
                         mutable=['batch_stats'])

    logits, updates = forward(variables, x, 2)
    halves = [forward(variables, part, 0) for part in jnp.split(x, 2)]
    mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  assert helpers.relative_error(np.concatenate([h[0] for h in halves]), logits) <= 1e-12
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(mean_stats)):
    assert helpers.relative_error(want, got) <= 1e-12
