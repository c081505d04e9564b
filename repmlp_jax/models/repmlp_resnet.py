"""RepMLP-ResNet-50 (arXiv 2105.01883 v1) and plain ResNet-50, as data.

ResNet-50 (torchvision layout, stride on the 3x3 conv) whose stride-1 blocks in c3 and c4 (the
stages at 1/8 and 1/16 of the input) become RepMLP blocks:
- Light block: 1x1 conv-BN-ReLU (-> out/8) -> RepMLP -> ReLU -> 1x1 conv-BN (-> out), + input, ReLU.
- Bottleneck block: 1x1 conv-BN-ReLU (-> mid = out/4) -> 3x3 conv-BN-ReLU (-> mid/r) -> RepMLP ->
  ReLU -> 3x3 conv-BN-ReLU (-> mid) -> 1x1 conv-BN (-> out), + input, ReLU.
Submodules carry the official key names (`stage0_0` for `stage0.0`, `stage2_1/light_repmlp`,
`btnk_conv4`, `shortcut`, `linear`, ...). The RepMLP's Global Perceptron is sized for the map at
the training resolution, so a model with RepMLP blocks takes exactly `image_size` inputs.
`deploy=True` is the form `repmlp_jax.reparam` produces: every conv-BN one biased conv and every
RepMLP three FCs, as the official deploy form.
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from repmlp_jax.models import batch_norm as bn_lib
from repmlp_jax.models import layers
from repmlp_jax.models import repmlp_v1 as repmlp_block

# Authors' configurations (RepMLP code), the paper's 320x320 group settings (Table 4: gA/B is
# fc3_groups A in c3 and B in c4, bottleneck blocks, h = w = 10, K = 1, 3, 5, 7) and the baseline.
ARCH_SETTINGS: dict[str, dict[str, Any]] = {
    'RepMLP-ResNet50-Light': dict(kind='light', c3_groups=4, c4_groups=4),
    'RepMLP-ResNet50-Bottleneck': dict(kind='bottleneck', c3_groups=8, c4_groups=8),
    'RepMLP-ResNet50-g4-8': dict(kind='bottleneck', c3_groups=4, c4_groups=8, h=10, w=10,
                                 reparam_conv_k=(1, 3, 5, 7), image_size=320),
    'RepMLP-ResNet50-g8-16': dict(kind='bottleneck', c3_groups=8, c4_groups=16, h=10, w=10,
                                  reparam_conv_k=(1, 3, 5, 7), image_size=320),
    'ResNet-50': dict(kind='plain'),
    # Tiny private variant for fast tests: every block type, several partitions in c3 and c4.
    '_RepMLP-ResNet-Tiny': dict(kind='light', depths=(1, 2, 2, 1), channels=(32, 64, 128, 256),
                                stem_channels=16, h=2, w=2, c3_groups=2, c4_groups=4,
                                image_size=64),
}

KINDS = ('plain', 'light', 'bottleneck')


class BlockSpec(NamedTuple):
  """One residual block: where it is, what it is and its sizes."""
  name: str          # Flax name, official key prefix with '_' for '.' ('stage2_1').
  stage: int         # 1 .. 4 (c2 .. c5).
  kind: str          # 'base' (ResNet bottleneck), 'light' or 'bottleneck'.
  in_channels: int
  out_channels: int
  stride: int
  size: int          # Side of the block's output map at the training resolution.
  groups: int        # fc3_groups of its RepMLP (RepMLP blocks only).
  r: int             # Channel reduction around the RepMLP (bottleneck blocks only).


def block_specs(model: 'RepMLPResNet') -> list[BlockSpec]:
  """Every residual block of `model` in order, as the official code lays them out."""
  specs, cin = [], model.stem_channels
  for n, (cout, depth) in enumerate(zip(model.channels, model.depths), start=1):
    ratio = 2 ** (n + 1)  # Total downsampling of stage n: 4, 8, 16, 32.
    for i in range(depth):
      stride = 2 if i == 0 and n > 1 else 1
      kind = 'base'
      if model.kind != 'plain' and stride == 1 and ratio in (8, 16):
        kind = model.kind
      groups = model.c3_groups if ratio == 8 else model.c4_groups
      r = model.bottleneck_r[0] if ratio == 8 else model.bottleneck_r[1]
      specs.append(BlockSpec(f'stage{n}_{i}', n, kind, cin, cout, stride,
                             model.image_size // ratio, groups, r))
      cin = cout
  return specs


class ResNetBlock(layers.Part):
  """The ResNet-50 bottleneck: 1x1 -> 3x3 (stride) -> 1x1, + shortcut, ReLU."""
  spec: BlockSpec

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    s, mid = self.spec, self.spec.out_channels // 4
    conv = self.conv_bn
    shortcut = x
    if s.stride != 1 or s.in_channels != s.out_channels:
      shortcut = conv(s.out_channels, 1, strides=s.stride, name='shortcut')(x, train=train)
    y = nn.relu(conv(mid, 1, name='conv1')(x, train=train))
    y = nn.relu(conv(mid, 3, strides=s.stride, padding=1, name='conv2')(y, train=train))
    y = conv(s.out_channels, 1, name='conv3')(y, train=train)
    return nn.relu(y + shortcut)


class RepMLPResBlock(layers.Part):
  """RepMLP Light or Bottleneck block (stride 1), + shortcut, ReLU."""
  spec: BlockSpec
  h: int
  w: int
  reparam_conv_k: Sequence[int]
  fc1_fc2_reduction: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    s = self.spec
    conv = self.conv_bn
    repmlp = lambda c, name: repmlp_block.RepMLP(  # pylint: disable=unnecessary-lambda-assignment
        c, c, s.size, s.size, self.h, self.w, tuple(self.reparam_conv_k), self.fc1_fc2_reduction,
        s.groups, deploy=self.deploy, dtype=self.dtype, precision=self.precision,
        bn_groups=self.bn_groups, name=name)
    shortcut = x
    if s.in_channels != s.out_channels:
      shortcut = conv(s.out_channels, 1, name='shortcut')(x, train=train)
    if s.kind == 'light':
      mid = s.out_channels // 8
      y = nn.relu(conv(mid, 1, name='light_conv1')(x, train=train))
      y = nn.relu(repmlp(mid, 'light_repmlp')(y, train=train))
      y = conv(s.out_channels, 1, name='light_conv3')(y, train=train)
    else:
      mid = s.out_channels // 4
      y = nn.relu(conv(mid, 1, name='btnk_conv1')(x, train=train))
      y = nn.relu(conv(mid // s.r, 3, padding=1, name='btnk_conv2')(y, train=train))
      y = nn.relu(repmlp(mid // s.r, 'btnk_repmlp')(y, train=train))
      y = nn.relu(conv(mid, 3, padding=1, name='btnk_conv4')(y, train=train))
      y = conv(s.out_channels, 1, name='btnk_conv5')(y, train=train)
    return nn.relu(y + shortcut)


class RepMLPResNet(nn.Module):
  """ResNet-50 with RepMLP Light or Bottleneck blocks in c3 and c4 (kind='plain': ResNet-50)."""
  kind: str = 'light'  # 'plain', 'light' or 'bottleneck'.
  depths: Sequence[int] = (3, 4, 6, 3)
  channels: Sequence[int] = (256, 512, 1024, 2048)
  stem_channels: int = 64
  h: int = 7  # Partition of every RepMLP.
  w: int = 7
  reparam_conv_k: Sequence[int] = (1, 3, 5)
  fc1_fc2_reduction: int = 1
  c3_groups: int = 4  # fc3_groups of the RepMLPs at 1/8 (c3) and 1/16 (c4).
  c4_groups: int = 4
  bottleneck_r: Sequence[int] = (2, 4)  # Bottleneck blocks' reduction in c3, c4.
  num_classes: int = 1000
  image_size: int = 224  # Fixes the RepMLPs' H, W (and their Global Perceptron's size).
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None

  @property
  def input_multiple(self) -> int:
    """Plain ResNet-50: any multiple of 32. With RepMLP blocks: exactly image_size."""
    return 32 if self.kind == 'plain' else self.image_size

  def check_settings(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}; got {self.kind!r}.')
    if not len(self.depths) == len(self.channels) == 4:
      raise ValueError(f'depths and channels need four stages; got {self.depths}, {self.channels}.')
    if self.kind == 'plain':
      return
    if self.image_size % 32:
      raise ValueError(f'image_size ({self.image_size}) must be a multiple of 32.')
    for s in block_specs(self):
      if s.kind == 'base':
        continue
      c = s.out_channels // 8 if s.kind == 'light' else s.out_channels // 4 // s.r
      if s.size % self.h or s.size % self.w:
        raise ValueError(f'{s.name}: its {s.size}x{s.size} map (image_size {self.image_size}) '
                         f'does not split into {self.h}x{self.w} partitions.')
      if c % s.groups:
        raise ValueError(f'{s.name}: the RepMLP\'s {c} channels are not a multiple of its '
                         f'fc3 groups ({s.groups}).')

  def check_input(self, x: jax.Array) -> None:
    if self.kind != 'plain':
      layers.check_images(x, 'This RepMLP-ResNet', self.image_size)
      return
    layers.check_images(x, 'ResNet-50')
    height, width = x.shape[1:3]
    if height % 32 or width % 32:
      raise ValueError(f'ResNet-50 takes inputs whose height and width are multiples of 32; '
                       f'got {height}x{width}.')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               bn_group_size: int = 0):
    """Classifies NHWC images.

    Args:
      x: (N, H, W, 3) images (see `input_multiple`).
      train: batch statistics for BatchNorm (needs mutable=['batch_stats']).
      bn_group_size: in training, BatchNorm statistics per group of this many consecutive
        images; 0: the whole batch.
      return_features: also return every stage's output.
    Returns:
      logits (N, num_classes), or with `return_features` a dict holding `stage_0` .. `stage_3`
      (outputs of c2 .. c5, at 1/4 .. 1/32 of the input), `pre_logits` and `logits`.
    """
    self.check_settings()
    self.check_input(x)
    groups = bn_lib.num_groups(x.shape[0], bn_group_size) if train else 1
    x = x.astype(self.dtype)
    x = layers.ConvBN(self.stem_channels, 7, strides=2, padding=3, deploy=self.deploy,
                      dtype=self.dtype, precision=self.precision, bn_groups=groups,
                      name='stage0_0')(x, train=train)
    # Padded with -inf, then a VALID pool: the same maximum as padding=1 in nn.max_pool, in a form
    # ONNX export (jax2onnx, which swaps in its own nn.max_pool) translates; it drops explicit pads.
    x = jnp.pad(nn.relu(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='VALID')
    features = {}
    for spec in block_specs(self):
      if spec.kind == 'base':
        block = ResNetBlock(spec, deploy=self.deploy, dtype=self.dtype,
                            precision=self.precision, bn_groups=groups, name=spec.name)
      else:
        block = RepMLPResBlock(spec, self.h, self.w, tuple(self.reparam_conv_k),
                               self.fc1_fc2_reduction, deploy=self.deploy, dtype=self.dtype,
                               precision=self.precision, bn_groups=groups, name=spec.name)
      x = block(x, train=train)
      features[f'stage_{spec.stage - 1}'] = x  # The last block of each stage stays.
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,
                      name='linear')(pooled)
    if return_features:
      return {**features, 'pre_logits': pooled, 'logits': logits}
    return logits
