"""The public re-parameterization: any training-form model -> its deploy form.

Pure functions over pytrees, jit-able (the model is static); each model family's rule lives in
its own module of this package and is found through the family registry (`repmlp_jax.families`).
"""

import functools
from typing import Any, Mapping

import chex
import jax
from flax import traverse_util

from repmlp_jax import families
from repmlp_jax.models import factory

Params = Mapping[str, Any]


def reparam_variables(model, variables: Params) -> dict[str, Any]:
  """The deploy-form variables of `model`'s training-form `variables` (pure, jit-able)."""
  rule = families.of(model).reparam_variables  # TypeError for an unregistered model class.
  if model.deploy:
    raise ValueError('reparam takes a training-form model; this one is already deploy=True.')
  _check_variables_fit(model, variables)
  return rule(model, variables)


def _check_variables_fit(model, variables: Params) -> None:
  """Refuses another model's variables, which the rules would turn into a misfit deploy tree."""
  # Flattened: a FrozenDict and a dict of the same variables compare equal. Shapes only: the
  # variables may be held in another dtype than the model's parameters (float64 proofs).
  expected = traverse_util.flatten_dict(factory.abstract_variables(model), sep='/')
  try:
    chex.assert_trees_all_equal_shapes(traverse_util.flatten_dict(variables, sep='/'), expected)
  except AssertionError as e:
    raise ValueError(f'The variables do not fit this {type(model).__name__}: {e}') from None


@functools.partial(jax.jit, static_argnums=0)
def _reparam_compiled(model, variables: Params) -> dict[str, Any]:
  return reparam_variables(model, variables)


def reparam(model, variables: Params):
  """Converts a training-form model and its variables to the equivalent deploy form.

  Pure: `variables` is not modified. Compiled once per model (the eager form would dispatch
  thousands of small ops); `reparam_variables` is the same function uncompiled, to be used
  inside a caller's own jit.

  Args:
    model: a training-form model (`deploy=False`) from `create_model`.
    variables: its {'params', 'batch_stats'}.
  Returns:
    (deploy_model, deploy_variables), with
    deploy_model.apply(deploy_variables, x) == model.apply(variables, x, train=False).
  """
  return model.clone(deploy=True), _reparam_compiled(model, variables)
