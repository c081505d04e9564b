"""Shapes, parameter counts, names and input checks of the RepMLPNet factory."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repmlp_jax
from repmlp_jax import model_io
from repmlp_jax.models import factory
from tests import fast_init

TINY = '_RepMLPNet-Tiny'

# Official parameter counts (authors' code; BN running statistics excluded).
OFFICIAL_PARAMS = {
    'RepMLPNet-T224': 38_293_608,
    'RepMLPNet-B224': 68_242_712,
    'RepMLPNet-T256': 58_687_848,
    'RepMLPNet-B256': 96_447_512,
    'RepMLPNet-D256': 86_887_648,
    'RepMLPNet-L256': 117_641_560,
}


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
  variables = model_io.abstract_variables(repmlp_jax.create_model(name))
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == OFFICIAL_PARAMS[name]


# RepMLP (v1) models: RepMLP-ResNet-50 (authors' configurations, the paper's group settings),
# the ResNet-50 baseline and the pure-MLP CIFAR model (tests/test_repmlp_resnet.py).
V1_MODELS = ['RepMLP-ResNet50-Light', 'RepMLP-ResNet50-Bottleneck', 'RepMLP-ResNet50-g4-8',
             'RepMLP-ResNet50-g8-16', 'ResNet-50', 'RepMLP-CIFAR-PureMLP']


def test_available_models_lists_every_official_variant():
  assert sorted(repmlp_jax.available_models()) == sorted([*OFFICIAL_PARAMS, *V1_MODELS])


@pytest.mark.parametrize('alias', ['b224', 'B224', 'RepMLPNet-B224', 'repmlpnet_b224', 'RepMLPNetB224'])
def test_aliases_resolve_case_insensitively(alias):
  assert repmlp_jax.resolve_name(alias) == 'RepMLPNet-B224'


def test_unknown_name_lists_the_available_ones():
  with pytest.raises(ValueError, match='Unknown model .*RepMLPNet-B224'):
    repmlp_jax.create_model('b512')


def test_unknown_override_is_refused():
  with pytest.raises(TypeError, match='no setting'):
    repmlp_jax.create_model('b224', widths=(1, 2))


def test_custom_settings_override_the_variant():
  model = repmlp_jax.create_model('b224', channels=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                                  sharesets=(1, 2, 4, 8), num_classes=7)
  v = model_io.abstract_variables(model)
  assert v['params']['head']['kernel'].shape == (64, 7)
  assert v['params']['stages_0_0']['repmlp_block']['fc3'].shape == (1, 56 * 56, 56 * 56)


def test_tiny_forward_shapes_and_features():
  model = repmlp_jax.create_model(TINY, num_classes=5)
  x = jnp.ones((2, 32, 32, 3))
  variables = fast_init.random_variables(model, x.shape)
  assert jax.jit(model.apply)(variables, x).shape == (2, 5)
  feats = repmlp_jax.extract_features(model, variables, x)
  assert [f.shape for f in feats] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16), (2, 1, 1, 32)]
  (last,) = repmlp_jax.extract_features(model, variables, x, out_indices=(-1,))
  np.testing.assert_array_equal(last, feats[3])
  with pytest.raises(ValueError, match='out of range'):
    repmlp_jax.extract_features(model, variables, x, out_indices=(4,))


def test_larger_inputs_that_split_evenly_work():
  model = repmlp_jax.create_model(TINY, num_classes=3)
  variables = fast_init.random_variables(model, (1, 32, 32, 3))
  assert jax.jit(model.apply)(variables, jnp.ones((1, 64, 96, 3))).shape == (1, 3)


@pytest.mark.parametrize('shape', [(1, 200, 224, 3), (1, 224, 230, 3)])
def test_wrong_input_size_names_the_sizes_that_work(shape):
  model = repmlp_jax.create_model('b224')
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with pytest.raises(ValueError, match=r'multiples of 224 \(e\.g\. 224, 448'):
    jax.eval_shape(model.init, jax.random.key(0), x)


def test_inconsistent_settings_are_refused():
  model = repmlp_jax.create_model('b224', channels=(8, 16, 32, 64))
  with pytest.raises(ValueError, match=r'Stage 3: channels \(64\) must be a multiple of sharesets \(128\)'):
    model_io.abstract_variables(model)


def test_wrong_channel_count_is_refused():
  model = repmlp_jax.create_model(TINY)
  with pytest.raises(ValueError, match='3 channels'):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))


def test_train_mode_updates_batch_stats():
  model = repmlp_jax.create_model(TINY, num_classes=4)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = fast_init.random_variables(model, x.shape)
  logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (4, 4)
  before = variables['batch_stats']['conv_embedding']['bn']['mean']
  after = updates['batch_stats']['conv_embedding']['bn']['mean']
  assert not np.allclose(before, after)


def test_model_spec_round_trip_and_checkpoint(tmp_path):
  model = repmlp_jax.create_model(TINY, num_classes=3, precision=jax.lax.Precision.HIGHEST)
  assert factory.model_from_spec(factory.model_spec(model)) == model
  variables = fast_init.random_variables(model, (1, 32, 32, 3))
  model_io.save_model(tmp_path / 'ckpt', model, variables)
  loaded_model, loaded = model_io.load_model(tmp_path / 'ckpt')
  assert loaded_model == model
  chex.assert_trees_all_equal(variables, loaded)
  with pytest.raises(FileExistsError, match='already exists'):
    model_io.save_model(tmp_path / 'ckpt', model, variables)
  with pytest.raises(ValueError, match='do not belong'):
    model_io.save_model(tmp_path / 'other', model.clone(deploy=True), variables)
  assert not (tmp_path / 'other').exists()
  with pytest.raises(FileNotFoundError, match='No model at'):
    model_io.load_model(tmp_path / 'missing')


def test_specs_of_older_checkpoints_with_a_retired_setting_still_load():
  model = repmlp_jax.create_model(TINY, num_classes=3)
  spec = factory.model_spec(model)
  spec['settings']['jit_units'] = True  # What checkpoints written before its removal hold.
  assert factory.model_from_spec(spec) == model
