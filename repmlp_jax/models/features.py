"""Multi-stage feature extraction (backbone use, like mmpretrain's out_indices).

The one definition of which stage outputs `out_indices` select: `extract_features` and the
`Predictor` (`repmlp_jax.inference.predictor`) both go through `stage_keys`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax


def num_stages(model: nn.Module) -> int:
  """How many stages `model` has: one per entry of its `depths` (every family's setting)."""
  return len(model.depths)


def stage_keys(model: nn.Module, out_indices: Sequence[int]) -> tuple[str, ...]:
  """The keys (`stage_i`) of the maps that `model.apply(..., return_features=True)` returns for
  `out_indices` (0 is the first stage; negative indices count from the last).

  Raises:
    ValueError: an index out of range.
  """
  n = num_stages(model)
  bad = [i for i in out_indices if not -n <= i < n]
  if bad:
    raise ValueError(f'out_indices {list(bad)} out of range for a model with {n} stages '
                     f'(valid: {-n} .. {n - 1}).')
  return tuple(f'stage_{i % n}' for i in out_indices)


def extract_features(model: nn.Module, variables: Any, x: jax.Array, *,
                     out_indices: Sequence[int] = (0, 1, 2, 3)) -> tuple[jax.Array, ...]:
  """Stage outputs of a training- or deploy-form model in eval mode.

  Args:
    model: a model from `create_model` (either form).
    variables: its variables.
    x: (N, H, W, 3) images.
    out_indices: which stages to return (0 is the first; negative indices count from the last).
  Returns:
    One NHWC feature map per index. RepMLPNet and RepMLP-ResNet: stage i at 1/(4 * 2**i) of the
    input resolution; the pure-MLP CIFAR model: stage i at 1/2**i.
  """
  keys = stage_keys(model, out_indices)
  features = model.apply(variables, x, train=False, return_features=True)
  return tuple(features[k] for k in keys)
