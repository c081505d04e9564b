"""Bounds of float32 comparisons, derived from float32's own rounding on the model compared.

A float32 forward pass differs from the exact (float64) result by the rounding of its own sums,
and two float32 implementations of one function differ by about the sum of theirs. So a float32
comparison against the PyTorch reference allows FACTOR times what float32 does to the reference
itself on the same input (its float32 logits against its float64 logits), not a fixed 1e-5: on
the small test models float32 rounding is ~1e-7, and a fixed 1e-5 let systematic errors of a few
1e-6 (a wrong epsilon, a wrong identity BatchNorm) pass. Exactness itself is proven in float64
elsewhere (<= 1e-10).

Where the reference is our own model (train form against deploy form), `flax_tolerance` does the
same with our model in float32 against itself in float64.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tests import helpers

# Our float32 error is a few times the reference's: XLA:CPU sums in other orders and blocks
# (RepMLPNet-B224 on CPU: 2.2e-5 against PyTorch's 5.9e-6 from float64, a ratio of 3.7), and the
# two errors add. 8 leaves room for both; a systematic error of the size of float32's own
# rounding on that model fails.
FACTOR = 8
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Floor: never ask for less than one ulp.


def torch_float64_logits(torch_model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
  """The reference's logits in float64 (a float64 copy of the model; the model is untouched)."""
  model64 = copy.deepcopy(torch_model).double()
  with torch.no_grad():
    return model64(x.double()).numpy()


def tolerance(torch_model: torch.nn.Module, x: torch.Tensor) -> float:
  """FACTOR x the float32 rounding of `torch_model` on `x` (at least FACTOR float32 ulps)."""
  with torch.no_grad():
    logits32 = torch_model(x.float()).numpy()
  return tolerance_from(torch_float64_logits(torch_model, x), logits32)


def tolerance_from(float64_output: np.ndarray, float32_output: np.ndarray) -> float:
  """FACTOR x the relative distance of a float32 output from its float64 truth (>= 8 ulps).

  For a second form of one function (a deploy form) the first form's float64 logits are its
  truth as well, which saves a float64 forward of a large model.
  """
  return FACTOR * max(helpers.relative_error(float64_output, float32_output), FLOAT32_EPS)


def flax_float64(model, variables, x, apply=None):
  """The float64 truth of our float32 `model`: its output with every float cast to float64.

  Args:
    model: a Flax model with a `dtype` field (its computation dtype).
    variables: its float32 variables (cast to float64 here).
    x: the float32 input.
    apply: `apply(model, variables, x) -> output pytree` (default: the eval-mode `model.apply`).
  Returns:
    The output pytree as float64 numpy arrays.
  """
  apply = apply or (lambda m, v, a: m.apply(v, a))
  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
    model64 = model.clone(dtype=jnp.float64)
    output = jax.jit(functools.partial(apply, model64))(jax.tree.map(to64, variables), to64(x))
    return jax.tree.map(np.asarray, output)


def flax_rounding(model, variables, x, float32_output=None, apply=None) -> float:
  """Relative error of our float32 `model` on `x` against the same model in float64.

  For comparisons whose reference is not a PyTorch model (train form against deploy form, two
  batchings of one model): the float64 run is the truth, and its distance to the float32 run is
  the float32 rounding on that model and input.

  Args:
    model, variables, x, apply: as for `flax_float64` (one output array).
    float32_output: the float32 output, when the caller has it already (saves a compile).
  Returns:
    max |float64 - float32| / max |float64|.
  """
  apply = apply or (lambda m, v, a: m.apply(v, a))
  if float32_output is None:
    float32_output = jax.jit(functools.partial(apply, model))(variables, x)
  return helpers.relative_error(flax_float64(model, variables, x, apply), float32_output)


def flax_tolerance(model, variables, x, float32_output=None, apply=None) -> float:
  """FACTOR x `flax_rounding(...)` (at least FACTOR float32 ulps)."""
  return FACTOR * max(flax_rounding(model, variables, x, float32_output, apply), FLOAT32_EPS)
