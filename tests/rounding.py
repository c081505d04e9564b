"""Bounds of float32 comparisons, derived from float32's own rounding on the model compared.

A float32 forward pass differs from the exact (float64) result by the rounding of its own sums,
and two float32 implementations of one function differ by about the sum of theirs. So a float32
comparison against the PyTorch reference allows FACTOR times what float32 does to the reference
itself on the same input (its float32 logits against its float64 logits), not a fixed 1e-5: on
the small test models float32 rounding is ~1e-7, and a fixed 1e-5 let systematic errors of a few
1e-6 (a wrong epsilon, a wrong identity BatchNorm) pass. Exactness itself is proven in float64
elsewhere (<= 1e-10).
"""

import copy

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


def torch_rounding(torch_model: torch.nn.Module, x: torch.Tensor) -> float:
  """Relative error of the float32 reference against itself in float64, on input `x`."""
  with torch.no_grad():
    logits32 = torch_model(x.float()).numpy()
  return helpers.relative_error(torch_float64_logits(torch_model, x), logits32)


def tolerance(torch_model: torch.nn.Module, x: torch.Tensor) -> float:
  """FACTOR x the float32 rounding of `torch_model` on `x` (at least FACTOR float32 ulps)."""
  return FACTOR * max(torch_rounding(torch_model, x), FLOAT32_EPS)
