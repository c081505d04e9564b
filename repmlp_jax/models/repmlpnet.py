"""RepMLPNet (Ding et al., CVPR 2022) and its official variants, as data.

The training form holds every Global, Partition and Local Perceptron; `deploy=True` builds the
inference form that `repmlp_jax.reparam` produces (three FCs per RepMLP block, BatchNorms after
linear ops folded in).
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from repmlp_jax.models import batch_norm as bn_lib
from repmlp_jax.models import layers


# Official settings (authors' repository; REFERENCE table). `partitions` is h = w per stage.
ARCH_SETTINGS: dict[str, dict[str, Any]] = {
    'RepMLPNet-T224': dict(channels=(64, 128, 256, 512), depths=(2, 2, 6, 2),
                           partitions=(56, 28, 14, 7), sharesets=(1, 4, 16, 128), image_size=224),
    'RepMLPNet-B224': dict(channels=(96, 192, 384, 768), depths=(2, 2, 12, 2),
                           partitions=(56, 28, 14, 7), sharesets=(1, 4, 32, 128), image_size=224),
    'RepMLPNet-T256': dict(channels=(64, 128, 256, 512), depths=(2, 2, 6, 2),
                           partitions=(64, 32, 16, 8), sharesets=(1, 4, 16, 128), image_size=256),
    'RepMLPNet-B256': dict(channels=(96, 192, 384, 768), depths=(2, 2, 12, 2),
                           partitions=(64, 32, 16, 8), sharesets=(1, 4, 32, 128), image_size=256),
    'RepMLPNet-D256': dict(channels=(80, 160, 320, 640), depths=(2, 2, 18, 2),
                           partitions=(64, 32, 16, 8), sharesets=(1, 4, 16, 128), image_size=256),
    'RepMLPNet-L256': dict(channels=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                           partitions=(64, 32, 16, 8), sharesets=(1, 4, 32, 256), image_size=256),
    # Tiny private variant for fast tests: several windows per stage and C/S > 1 everywhere,
    # so the official re-assembly permutation is exercised. Input 32 x 32.
    '_RepMLPNet-Tiny': dict(channels=(8, 16, 16, 32), depths=(1, 1, 2, 1),
                            partitions=(4, 2, 1, 1), sharesets=(2, 4, 4, 8), image_size=32),
}


class RepMLPNet(nn.Module):
  """RepMLPNet: conv stem, four stages of RepMLPNet units joined by strided convs, BN-pool-linear head."""
  channels: Sequence[int]
  depths: Sequence[int]
  partitions: Sequence[int]  # Window side h = w of each stage.
  sharesets: Sequence[int]
  reparam_conv_k: Sequence[int] = (1, 3)
  num_classes: int = 1000
  gp_hidden_divisor: int = 1  # 1: C // 4 (official); 8: make_divisible(C // 4, 8) (mmpretrain).
  ffn_expand: int = 4
  image_size: int | None = None  # Training resolution; informative only.
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  # Run each stage's identical units as one lax.scan over their stacked variables: the same
  # computation, the variables keep their per-unit names, and the program holds one unit per
  # stage instead of every unit (B224: 4 instead of 18). Off by default (benchmarks/README.md).
  scan_units: bool = False

  @property
  def input_multiple(self) -> int:
    """H and W must be multiples of this: every stage splits evenly into its windows."""
    return math.lcm(*(4 * 2**i * p for i, p in enumerate(self.partitions)))

  def check_settings(self) -> None:
    n = len(self.channels)
    if not len(self.depths) == len(self.partitions) == len(self.sharesets) == n:
      raise ValueError('channels, depths, partitions and sharesets need one entry per stage; got '
                       f'{self.channels}, {self.depths}, {self.partitions}, {self.sharesets}.')
    for i, (c, s) in enumerate(zip(self.channels, self.sharesets)):
      if c % s:
        raise ValueError(f'Stage {i}: channels ({c}) must be a multiple of sharesets ({s}).')
    if any(k % 2 == 0 for k in self.reparam_conv_k):
      raise ValueError(f'reparam_conv_k must hold odd kernel sizes; got {self.reparam_conv_k}.')

  def check_input(self, x: jax.Array) -> None:
    layers.check_images(x, 'RepMLPNet')
    m = self.input_multiple
    height, width = x.shape[1:3]
    if height % m or width % m:
      raise ValueError(
          f'RepMLPNet with partitions {tuple(self.partitions)} takes inputs whose height and width '
          f'are multiples of {m} (e.g. {m}, {2 * m}, {3 * m}); got {height}x{width}. Resize or '
          f'crop the images to such a size.')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               bn_group_size: int = 0):
    """Classifies NHWC images.

    Args:
      x: (N, H, W, 3) images, H and W multiples of `input_multiple`.
      train: batch statistics for BatchNorm (needs mutable=['batch_stats']).
      bn_group_size: in training, BatchNorm statistics per group of this many consecutive images
        (as each GPU's under PyTorch's DistributedDataParallel); 0: the whole batch.
      return_features: also return every stage's output.
    Returns:
      logits (N, num_classes), or with `return_features` a dict holding `stage_0` .. `stage_3`
      (NHWC output of each stage, before the next downsampling), `pre_logits` (N, C) and `logits`.
    """
    self.check_settings()
    self.check_input(x)
    groups = bn_lib.num_groups(x.shape[0], bn_group_size) if train else 1
    conv_bn = functools.partial(layers.ConvBN, deploy=self.deploy, dtype=self.dtype,
                                precision=self.precision, bn_groups=groups)
    x = x.astype(self.dtype)
    x = nn.relu(conv_bn(self.channels[0], 4, strides=4, name='conv_embedding')(x, train=train))
    features = {}
    for s, (c, depth, p, shareset) in enumerate(
        zip(self.channels, self.depths, self.partitions, self.sharesets)):
      if s > 0:
        x = nn.relu(conv_bn(c, 2, strides=2, name=f'embeds_{s - 1}')(x, train=train))
      gp_hidden = layers.make_divisible(c // 4, self.gp_hidden_divisor)
      unit = functools.partial(layers.RepMLPNetUnit, c, p, p, shareset,
                               tuple(self.reparam_conv_k), gp_hidden, self.ffn_expand,
                               deploy=self.deploy, dtype=self.dtype, precision=self.precision,
                               bn_groups=groups)
      names = [f'stages_{s}_{b}' for b in range(depth)]
      # In training and in the deploy form, a stage that is one window keeps its channels as
      # (C/S, S) through its units (layers.split_channels); the training form's evaluation
      # compiles to fewer bytes on TPU with (N, H, W, C) maps (benchmarks/README.md, "The TPU
      # compiler's count"). The deploy form merges the spatial axes of stages with more than 4
      # sharesets (B224's stage 1 of 4 sharesets compiles to fewer bytes with them apart:
      # benchmarks/README.md, "The deploy forward").
      split = (train or self.deploy) and x.shape[1:3] == (p, p) and shareset > 1
      if split:
        x = layers.split_channels(x, shareset, merge_spatial=self.deploy and shareset > 4)
      if self.scan_units and depth > 1 and not self.is_initializing():
        x = self._scan_units(unit(parent=None), names, x, train)
      else:
        for name in names:
          x = unit(name=name)(x, train=train)
      if split:
        x = x.reshape(x.shape[0], p, p, c)
      features[f'stage_{s}'] = x
    x = layers.batch_norm(train, self.dtype, name='head_norm', groups=groups)(x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,
                      name='head')(pooled)
    if return_features:
      return {**features, 'pre_logits': pooled, 'logits': logits}
    return logits

  def _scan_units(self, unit: nn.Module, names: Sequence[str], x: jax.Array,
                  train: bool) -> jax.Array:
    """Applies the units `names` (variables of one structure) in order, as one lax.scan.

    `unit` is an unbound module of their settings, applied to each unit's own variables in the
    scan body; in training the units' new BatchNorm statistics are written back under their
    names, as if each unit had been called.
    """
    collections = [c for c in ('params', 'batch_stats') if c in self.variables]
    stacked = {c: jax.tree.map(lambda *v: jnp.stack(v), *[self.variables[c][n] for n in names])
               for c in collections}
    update_stats = train and 'batch_stats' in collections

    def body(x, variables):
      if update_stats:
        y, updates = unit.apply(variables, x, train=True, mutable=['batch_stats'])
        return y, updates['batch_stats']
      return unit.apply(variables, x, train=train), None

    x, new_stats = jax.lax.scan(body, x, stacked)
    if update_stats and self.is_mutable_collection('batch_stats'):
      for b, name in enumerate(names):
        self.put_variable('batch_stats', name, jax.tree.map(lambda v: v[b], new_stats))
    return x
