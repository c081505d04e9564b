"""Stage features: one definition (models/features.py) behind extract_features and the Predictor."""

import jax
import numpy as np
import pytest

import repmlp_jax
from repmlp_jax import families
from repmlp_jax.inference import predictor
from repmlp_jax.models import features
from tests import fast_init
from tests import helpers
from tests import small_models


def test_every_family_has_a_small_model_here():
  got = {families.of(small_models.create(f, 2)[0]) for f in small_models.SMALL_MODELS}
  assert got == set(families.FAMILIES.values())


@pytest.mark.parametrize('family', sorted(small_models.SMALL_MODELS))
def test_predictor_features_are_extract_features(family):
  model, size = small_models.create(family, num_classes=5)
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  variables = fast_init.random_variables(model, x.shape)
  n = features.num_stages(model)
  returned = jax.eval_shape(lambda v: model.apply(v, x, train=False, return_features=True),
                            variables)
  assert sorted(k for k in returned if k.startswith('stage_')) == [
      f'stage_{i}' for i in range(n)]  # The count matches what the model returns.

  every_stage = jax.jit(lambda v, x: repmlp_jax.extract_features(
      model, v, x, out_indices=tuple(range(n))))(variables, x)
  run = predictor.Predictor(model, variables, reparameterize_model=False, batch_size=2,
                            class_names=[str(i) for i in range(5)])
  got = run.features(x, out_indices=(-1, 0))  # Batches of 2 and 1 (padded).
  for a, b in zip(got, (every_stage[-1], every_stage[0])):
    assert a.shape == b.shape
    assert helpers.relative_error(np.asarray(b), a) < 1e-5

  for call in (lambda: run.features(x, out_indices=(n,)),
               lambda: repmlp_jax.extract_features(model, variables, x, out_indices=(n,))):
    with pytest.raises(ValueError, match=f'out of range for a model with {n} stages'):
      call()
