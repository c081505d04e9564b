"""Multi-stage feature extraction (backbone use, like mmpretrain's out_indices)."""

from typing import Any, Sequence

import flax.linen as nn
import jax


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
  features = model.apply(variables, x, train=False, return_features=True)
  num_stages = sum(1 for k in features if k.startswith('stage_'))
  bad = [i for i in out_indices if not -num_stages <= i < num_stages]
  if bad:
    raise ValueError(f'out_indices {bad} out of range for a model with {num_stages} stages.')
  return tuple(features[f'stage_{i % num_stages}'] for i in out_indices)
