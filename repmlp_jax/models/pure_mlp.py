"""The pure-MLP CIFAR model of RepMLP (arXiv 2105.01883, Sec. 4.1 and its pure-MLP figure).

"Pure MLP": no conv bigger than 1x1 at inference. RepMLPs (g = 2, h = w = 8) interleaved with
FCs (1x1 conv-BN) in three stages of 16, 32, 64 channels at 32x32, 16x16 and 8x8, with 2x2 max
pooling between stages. A BN follows every conv and a ReLU every RepMLP and every conv-BN.

What the paper states: the three stages, their channels and resolutions, g = 2, h = w = 8, max
pooling, BN/ReLU placement, the FC that ends stage 1 mapping 16 to 32 channels, and 52.8M FLOPs
for the converted model (91.11% top-1 on CIFAR-10). What this implementation assumes, because
the figure's layer list is not in the text:
- a 1x1 conv-BN-ReLU stem (3 -> 16 channels);
- two units per stage, each RepMLP -> ReLU -> FC-BN-ReLU; a stage's last FC maps to the next
  stage's channels (the last stage's keeps 64); then global average pooling and a linear
  classifier. With fc1_fc2_reduction 1 this deploy form has 52.81M multiply-accumulates, the
  paper's 52.8M (each RepMLP's fc3 alone is 8.39M);
- Local Perceptron kernels K = 1, 3, 5, 7 (the paper's example for partitions larger than 7);
- 2x2 max pooling with stride 2.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from repmlp_jax.models import batch_norm as bn_lib
from repmlp_jax.models import layers
from repmlp_jax.models import repmlp_v1 as repmlp_block

ARCH_SETTINGS: dict[str, dict[str, Any]] = {
    'RepMLP-CIFAR-PureMLP': dict(channels=(16, 32, 64), depths=(2, 2, 2), h=8, w=8,
                                 fc3_groups=2, reparam_conv_k=(1, 3, 5, 7), image_size=32),
}


class PureMLPUnit(layers.Part):
  """RepMLP -> ReLU -> FC (1x1 conv-BN) -> ReLU."""
  out_channels: int
  size: int
  h: int
  w: int
  reparam_conv_k: Sequence[int]
  fc1_fc2_reduction: int
  fc3_groups: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    repmlp = repmlp_block.RepMLP(c, c, self.size, self.size, self.h, self.w,
                                 tuple(self.reparam_conv_k), self.fc1_fc2_reduction,
                                 self.fc3_groups, deploy=self.deploy, dtype=self.dtype,
                                 precision=self.precision, bn_groups=self.bn_groups,
                                 name='repmlp')
    x = repmlp(x, train=train)
    x = self.conv_bn(self.out_channels, 1, name='fc')(nn.relu(x), train=train)
    return nn.relu(x)


class PureMLPNet(nn.Module):
  """The paper's pure-MLP CIFAR model: stages of RepMLP and FC units joined by max pooling."""
  channels: Sequence[int] = (16, 32, 64)
  depths: Sequence[int] = (2, 2, 2)  # Units (RepMLP + FC) per stage.
  h: int = 8
  w: int = 8
  fc3_groups: int = 2
  reparam_conv_k: Sequence[int] = (1, 3, 5, 7)
  fc1_fc2_reduction: int = 1
  num_classes: int = 10
  image_size: int = 32  # Fixes the RepMLPs' H, W (and their Global Perceptron's size).
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None

  @property
  def input_multiple(self) -> int:
    """The model takes exactly image_size inputs (its Global Perceptrons are sized for them)."""
    return self.image_size

  def check_settings(self) -> None:
    if len(self.channels) != len(self.depths):
      raise ValueError(f'channels and depths need one entry per stage; got {self.channels}, '
                       f'{self.depths}.')
    for s, c in enumerate(self.channels):
      size = self.image_size // 2**s
      if self.image_size % 2**s or size % self.h or size % self.w:
        raise ValueError(f'Stage {s}: its map ({self.image_size}/{2**s}) does not split into '
                         f'{self.h}x{self.w} partitions; change image_size, h or w.')
      if c % self.fc3_groups:
        raise ValueError(f'Stage {s}: channels ({c}) must be a multiple of fc3_groups '
                         f'({self.fc3_groups}).')

  def check_input(self, x: jax.Array) -> None:
    layers.check_images(x, 'PureMLPNet', self.image_size)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               bn_group_size: int = 0):
    """Classifies NHWC images.

    Args:
      x: (N, image_size, image_size, 3) images.
      train: batch statistics for BatchNorm (needs mutable=['batch_stats']).
      bn_group_size: in training, BatchNorm statistics per group of this many consecutive
        images; 0: the whole batch.
      return_features: also return every stage's output.
    Returns:
      logits (N, num_classes), or with `return_features` a dict holding `stage_0` .. (each
      stage's output before the max pooling, at 1, 1/2, 1/4 of the input), `pre_logits` and
      `logits`.
    """
    self.check_settings()
    self.check_input(x)
    groups = bn_lib.num_groups(x.shape[0], bn_group_size) if train else 1
    x = x.astype(self.dtype)
    x = layers.ConvBN(self.channels[0], 1, deploy=self.deploy, dtype=self.dtype,
                      precision=self.precision, bn_groups=groups, name='stem')(x, train=train)
    x = nn.relu(x)
    features = {}
    for s, (c, depth) in enumerate(zip(self.channels, self.depths)):
      if s > 0:
        # By keyword: ONNX export (jax2onnx) replaces nn.max_pool with a keyword-only version.
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
      last = self.channels[s + 1] if s + 1 < len(self.channels) else c
      for i in range(depth):
        unit = PureMLPUnit(last if i == depth - 1 else c, self.image_size // 2**s, self.h, self.w,
                           tuple(self.reparam_conv_k), self.fc1_fc2_reduction, self.fc3_groups,
                           deploy=self.deploy, dtype=self.dtype, precision=self.precision,
                           bn_groups=groups, name=f'stage{s}_{i}')
        x = unit(x, train=train)
      features[f'stage_{s}'] = x
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,
                      name='linear')(pooled)
    if return_features:
      return {**features, 'pre_logits': pooled, 'logits': logits}
    return logits
