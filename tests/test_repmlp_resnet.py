"""RepMLP-ResNet-50, ResNet-50 and the pure-MLP CIFAR model: counts, shapes, names, reparam.

The full-size train form == deploy form check of both RepMLP-ResNet-50 variants runs with the
PyTorch golden test (tests/test_torch_keys_resnet.py), which needs the same two compiles.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax import model_io
from repmlp_jax.models import factory
from repmlp_jax import report
from tests import fast_init
from tests import helpers
from tests import rounding
from tests import torch_reference as tr

TINY = '_RepMLP-ResNet-Tiny'  # 64x64 inputs
CIFAR = 'RepMLP-CIFAR-PureMLP'
V1_MODELS = ['RepMLP-ResNet50-Light', 'RepMLP-ResNet50-Bottleneck', 'RepMLP-ResNet50-g4-8',
             'RepMLP-ResNet50-g8-16', 'ResNet-50', CIFAR]

# Training-form parameter counts of the official code (1000 classes).
OFFICIAL_PARAMS = {'RepMLP-ResNet50-Light': 87_038_248, 'RepMLP-ResNet50-Bottleneck': 41_071_144,
                   'ResNet-50': 25_557_032}


def _params(model) -> int:
  return report.count_params(model_io.abstract_variables(model))


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
  assert _params(repmlp_jax.create_model(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name, groups', [('RepMLP-ResNet50-g4-8', (4, 8)),
                                          ('RepMLP-ResNet50-g8-16', (8, 16))])
def test_group_settings_match_the_reference_at_320(name, groups):
  with torch.device('meta'):
    reference = tr.RepMLPResNet('bottleneck', img_size=320, h=10, w=10,
                                reparam_conv_k=(1, 3, 5, 7), c3_groups=groups[0],
                                c4_groups=groups[1])
  assert _params(repmlp_jax.create_model(name)) == tr.count_params(reference)


@pytest.mark.parametrize('name', V1_MODELS)
def test_reparam_gives_the_deploy_models_variables(name):
  model = repmlp_jax.create_model(name)
  deploy_vars = jax.eval_shape(functools.partial(repmlp_jax.reparam_variables, model),
                               model_io.abstract_variables(model))
  expected = model_io.abstract_variables(model.clone(deploy=True))
  chex.assert_trees_all_equal_shapes(deploy_vars, expected)
  assert 'batch_stats' not in expected  # Every BatchNorm is folded.


def test_names_resolve_and_aliases_are_unambiguous():
  assert sorted(repmlp_jax.available_models()) == sorted(
      [n for n in factory.MODELS if not n.startswith('_')])
  assert set(V1_MODELS) <= set(repmlp_jax.available_models())
  for name in factory.MODELS:
    short = name.lstrip('_').partition('-')[2]
    assert repmlp_jax.resolve_name(name) == name
    assert repmlp_jax.resolve_name(short) == name, (short, name)  # no two names share one
  assert repmlp_jax.resolve_name('RepMLP-ResNet50-g4/8') == 'RepMLP-ResNet50-g4-8'
  assert repmlp_jax.resolve_name('resnet50_light') == 'RepMLP-ResNet50-Light'
  assert repmlp_jax.resolve_name('resnet50') == 'ResNet-50'


def _feature_shapes(model, variables, x, **kwargs):
  """extract_features traced, not run: shapes (and errors) without compiling."""
  fn = functools.partial(repmlp_jax.extract_features, model, **kwargs)
  return [f.shape for f in jax.eval_shape(fn, variables, x)]


@functools.partial(jax.jit, static_argnums=0)
def _train_and_deploy_logits(model, variables, x):
  deploy_model, deploy_vars = repmlp_jax.reparam(model, variables)
  return model.apply(variables, x), deploy_model.apply(deploy_vars, x)


def test_tiny_plain_reparam_equivalence_float32():
  # Both RepMLP kinds: float32 at full size in test_torch_keys_resnet, float64 below.
  model = repmlp_jax.create_model(TINY, num_classes=10, kind='plain')
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
  variables = fast_init.random_variables(model, x.shape, seed=2)
  y, y_deploy = _train_and_deploy_logits(model, variables, x)
  assert y.shape == (2, 10)
  # Bound: 8x the training form's float32 rounding on x (against itself in float64,
  # tests/rounding.py). Measured: rounding 2.3e-7, so a bound of 1.8e-6; train vs deploy 2.6e-7.
  tolerance = rounding.flax_tolerance(model, variables, x, float32_output=y)
  err = helpers.relative_error(y, y_deploy)
  assert err <= tolerance, (err, tolerance)


@pytest.mark.parametrize('kind', ['light', 'bottleneck'])
def test_tiny_reparam_equivalence_float64(kind):
  with jax.enable_x64(True):
    model = repmlp_jax.create_model(TINY, num_classes=10, kind=kind, dtype=jnp.float64,
                                    reparam_conv_k=(1, 3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)))
    variables = fast_init.random_variables(model, x.shape, seed=3, dtype=jnp.float64)
    y, y_deploy = _train_and_deploy_logits(model, variables, x)
    assert y.dtype == jnp.float64
    assert helpers.relative_error(y, y_deploy) <= 1e-10


def test_tiny_features_train_mode_and_spec():
  model = repmlp_jax.create_model(TINY, num_classes=4, kind='bottleneck')
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  variables = fast_init.random_variables(model, x.shape)
  assert _feature_shapes(model, variables, x) == [(2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128),
                                      (2, 2, 2, 256)]
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  fc3_bn_mean = lambda v: v['batch_stats']['stage2_1']['btnk_repmlp']['fc3_bn']['mean']
  assert not np.allclose(fc3_bn_mean(variables), fc3_bn_mean(updates))
  assert factory.model_from_spec(factory.model_spec(model)) == model


@pytest.mark.parametrize('name, shape, message', [
    (TINY, (1, 128, 128, 3), r'exactly 64x64 inputs'),
    ('RepMLP-ResNet50-Light', (1, 256, 256, 3), r'exactly 224x224 inputs'),
    ('ResNet-50', (1, 224, 230, 3), r'multiples of 32'),
    (CIFAR, (1, 64, 64, 3), r'exactly 32x32 inputs'),
    (CIFAR, (1, 32, 32, 1), r'3 channels'),
])
def test_wrong_input_sizes_are_refused(name, shape, message):
  model = repmlp_jax.create_model(name)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_inconsistent_settings_are_refused():
  with pytest.raises(ValueError, match=r'does not split into 7x7 partitions'):
    model_io.abstract_variables(repmlp_jax.create_model('RepMLP-ResNet50-Light', image_size=256))
  with pytest.raises(ValueError, match=r'not a multiple of its fc3 groups \(5\)'):
    model_io.abstract_variables(repmlp_jax.create_model('RepMLP-ResNet50-Light', c4_groups=5))
  with pytest.raises(ValueError, match='kind must be one of'):
    model_io.abstract_variables(repmlp_jax.create_model('ResNet-50', kind='heavy'))


def test_plain_resnet_takes_other_multiples_of_32():
  model = repmlp_jax.create_model('ResNet-50')
  out = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 160, 96, 3),
                                                                           jnp.float32))
  assert out['params']['linear']['kernel'].shape == (2048, 1000)


def test_cifar_model_structure_and_flops():
  model = repmlp_jax.create_model(CIFAR, num_classes=10)
  variables = model_io.abstract_variables(model)
  assert report.count_params(variables) == 22_844_858
  unit = variables['params']['stage0_0']['repmlp']
  assert unit['fc3'].shape == (2, 8 * 64, 8 * 64)  # g = 2, 16 channels, 8x8 partitions
  assert unit['fc1_fc2']['fc1']['kernel'].shape == (16 * 16, 16 * 16)  # 4x4 partitions
  assert 'fc1_fc2' not in variables['params']['stage2_0']['repmlp']  # 8x8 map: one partition
  deploy = model.clone(deploy=True)
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(
      model_io.abstract_variables(deploy))[0] if leaf.ndim == 4]
  assert kernels and all(k[:2] == (1, 1) for k in kernels)  # pure MLP: no conv beyond 1x1
  # The paper's 52.8M FLOPs are multiply-accumulates; XLA adds the element-wise work (~0.5%).
  assert 52.8e6 <= report.forward_flops(deploy, 32) / 2 <= 53.3e6


def test_cifar_model_reparam_equivalence_and_features():
  model = repmlp_jax.create_model(CIFAR, num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = fast_init.random_variables(model, x.shape, seed=5)
  y, y_deploy = _train_and_deploy_logits(model, variables, x)
  assert y.shape == (2, 10)
  # Bound: 8x the training form's float32 rounding on x (tests/rounding.py). Measured: rounding
  # under one ulp (the floor, 1.2e-7), so a bound of 9.5e-7; train vs deploy 1.3e-7.
  tolerance = rounding.flax_tolerance(model, variables, x, float32_output=y)
  err = helpers.relative_error(y, y_deploy)
  assert err <= tolerance, (err, tolerance)
  assert _feature_shapes(model, variables, x, out_indices=(0, 1, -1)) == [
      (2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 64)]
  with pytest.raises(ValueError, match='out of range for a model with 3 stages'):
    _feature_shapes(model, variables, x, out_indices=(3,))
