"""Fine-tuning every model family to a new number of classes (`trainer.load_pretrained`).

A saved 7-class model of each family is loaded into a fresh 3-class run: every variable but the
family's classifier must come from the file, the classifier must stay freshly initialised, and
the result must be a state the run's train step takes (same tree, shapes, dtypes, shardings).
Nothing is compiled: variables and the fresh state are drawn with numpy.
"""

import chex
import jax
import numpy as np
import pytest

from configs import common
from repmlp_jax import families
from repmlp_jax import model_io
from repmlp_jax.train import experiment
from repmlp_jax.train import sharding
from repmlp_jax.train import trainer
from tests import fast_init
from tests.small_models import SMALL_MODELS

NEW_CLASSES, OLD_CLASSES = 3, 7


def _flat(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f'{prefix}{key}/')
    else:
      yield f'{prefix}{key}', np.asarray(value)


def _experiment(name, overrides, size) -> experiment.Experiment:
  config = common.get_config()
  config.model = name
  config.model_overrides.update(overrides)
  config.image_size = config.eval_image_size = size
  config.global_batch_size = 8
  steps = experiment.Steps(per_epoch=2, total=4, warmup=1, eval_every=4, checkpoint_every=4,
                           log_every=1)
  return experiment.Experiment(config, num_classes=NEW_CLASSES, steps=steps,
                               mesh=sharding.create_mesh(jax.devices()[:1]))


@pytest.mark.parametrize('family', sorted(SMALL_MODELS))
def test_fine_tuning_to_a_new_class_count(family, tmp_path):
  exp = _experiment(*SMALL_MODELS[family])
  size = exp.config.image_size
  source = exp.model.clone(num_classes=OLD_CLASSES)
  # Drawn with numpy (no init to compile), so loaded values are told apart from fresh ones.
  variables = fast_init.random_variables(source, (1, size, size, 3), seed=123)
  model_io.save_model(tmp_path / 'pretrained', source, variables)

  # A fresh state of the run's tree, shapes, dtypes and shardings, drawn with numpy (compiling
  # the run's init would take most of the test's time and test nothing more here).
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: jax.device_put(
      rng.normal(size=a.shape).astype(a.dtype), a.sharding), exp.abstract_state)
  fresh = jax.device_get(state)
  loaded = trainer.load_pretrained(exp, state, str(tmp_path / 'pretrained'))
  # The state a train step takes: same tree, shapes, dtypes and shardings as a fresh one.
  assert jax.tree.structure(loaded) == jax.tree.structure(exp.abstract_state)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(exp.abstract_state)):
    assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)
  loaded = jax.device_get(loaded)
  classifier = families.of(exp.model).classifier + '/'
  seen_classifier = 0
  for collection in ('params', 'batch_stats'):
    saved = dict(_flat(jax.device_get(variables[collection])))
    start = dict(_flat(fresh[collection]))
    for key, value in _flat(loaded[collection]):
      if key.startswith(classifier):
        seen_classifier += 1
        np.testing.assert_array_equal(value, start[key], err_msg=key)
        assert value.shape[-1] == NEW_CLASSES
      else:
        np.testing.assert_array_equal(value, saved[key], err_msg=key)
  assert seen_classifier == 2  # kernel and bias
  chex.assert_trees_all_equal(loaded['opt_state'], fresh['opt_state'])  # Stays fresh.
