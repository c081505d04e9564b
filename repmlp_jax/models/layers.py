"""Building blocks of RepMLPNet (CVPR 2022) in Flax linen, NHWC.

Submodules are named after the keys of the official PyTorch state_dict (`conv`, `bn`, `fc1`,
`fc3`, `fc3_bn`, `repconv3`, `prebn1`, ...) so that importing official weights is a rename plus
layout transposes. Every module carries a `deploy` flag: the training form holds the conv
branches and BatchNorms that `repmlp_jax.reparam` folds away; the deploy form holds only what is
left (three FCs per RepMLP block).
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from repmlp_jax.models import batch_norm as bn_lib

Dtype = Any
Precision = Any

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1.


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, *, groups: int = 1,
               channel_axes: int = 1) -> bn_lib.BatchNorm:
  """The BatchNorm of every model: PyTorch's running variance; in training mode its statistics
  are the whole batch's (global under jit with sharded batches), or each of `groups` groups of
  consecutive images' (`batch_norm.num_groups`). `channel_axes`: the input's trailing axes that
  hold the channels (2 for a map held as (N, H, W, C / S, S))."""
  return bn_lib.BatchNorm(use_running_average=not train, num_groups=groups,
                          channel_axes=channel_axes, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                          dtype=dtype, name=name)


def check_images(x: jax.Array, model: str, size: int | None = None) -> None:
  """Refuses anything but NHWC images with 3 channels and, with `size`, any other side than
  size x size (models whose Global Perceptrons are sized for one resolution)."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{model} takes NHWC images with 3 channels; got shape {x.shape}.')
  if size is not None and x.shape[1:3] != (size, size):
    raise ValueError(
        f'{model} takes exactly {size}x{size} inputs (its RepMLPs\' Global Perceptron is sized '
        f'for that resolution); got {x.shape[1]}x{x.shape[2]}. Resize the images, or build the '
        'model with image_size set to their size.')


def make_divisible(value: float, divisor: int) -> int:
  """Rounds `value` to a multiple of `divisor`, never below 90% of it (mmpretrain's rule)."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


def split_channels(x: jax.Array, sharesets: int, merge_spatial: bool = False) -> jax.Array:
  """(N, H, W, C) -> (N, H, W, C/S, S): channel r*S + s at [..., r, s], as the partition rows;
  with `merge_spatial`, (N, H*W, 1, C/S, S) (position y*W + x).

  In training and in the deploy form the units of a one-window stage keep their maps so
  (RepMLPNet): fc3 contracts the spatial axes per shareset and the FFN the channels, and with the
  two channel axes apart the TPU compiler finds one layout that serves both (held as one C axis,
  it copies the map around every fc3, forward and backward). The deploy form has no conv over
  the window and merges the spatial axes of its stages of more than 4 sharesets (RepMLPNet):
  with H and W apart (14 x 14, 7 x 7) the TPU compiler pads and copies them, and their FFNs do
  not fuse (benchmarks/README.md, "The deploy forward").
  """
  n, height, width, c = x.shape
  if merge_spatial:
    height, width = height * width, 1
  return x.reshape(n, height, width, c // sharesets, sharesets)


def partition(x: jax.Array, h: int, w: int, sharesets: int) -> jax.Array:
  """Cuts (N, H, W, C) into rows of `sharesets` channels over h x w windows.

  Returns (N, H/h, W/w, C/S, h, w, S): row (n, i, j, r) holds channels r*S .. r*S+S-1 of window
  (i, j), the layout of the official `partitions.reshape(-1, S, h, w)`.
  """
  n, height, width, c = x.shape
  x = x.reshape(n, height // h, h, width // w, w, c // sharesets, sharesets)
  return x.transpose(0, 1, 3, 5, 2, 4, 6)


def reassemble(rows: jax.Array) -> jax.Array:
  """Puts partition rows back into a (N, H, W, C) map exactly as the official RepMLPNet does.

  The official block reads its (N*hp*wp*C/S, S, h, w) buffer as (N*C/S, hp, wp, S, h, w). When
  hp*wp > 1 and C/S > 1 that is not the inverse of `partition` but a fixed permutation of channels
  and windows; the released weights were trained with it, so it is reproduced here.

  Args:
    rows: (N, hp, wp, C/S, h, w, S), as returned by `partition`.
  Returns:
    (N, hp*h, wp*w, C).
  """
  n, hp, wp, groups, h, w, s = rows.shape
  # (hp, wp, C/S) row order reinterpreted as (C/S, hp, wp); the (h, w, S) part keeps its meaning.
  rows = rows.reshape(n, groups, hp, wp, h, w, s)
  return rows.transpose(0, 2, 4, 3, 5, 1, 6).reshape(n, hp * h, wp * w, groups * s)


def conv_params(module: nn.Module, kernel_shape: tuple[int, ...],
                use_bias: bool) -> tuple[jax.Array, jax.Array | None]:
  """The variables of `nn.Conv` (kernel HWIO, bias (O,)), initialized alike, in float32 (nn.Conv's
  param_dtype, also under jax_enable_x64): (kernel, bias or None)."""
  kernel = module.param('kernel', nn.initializers.lecun_normal(), kernel_shape, jnp.float32)
  if not use_bias:
    return kernel, None
  return kernel, module.param('bias', nn.initializers.zeros, kernel_shape[-1:], jnp.float32)


class Part(nn.Module, kw_only=True):
  """What every part of a model is built with, by keyword: its form (training or deploy),
  compute dtype, matmul precision and, in training, the BatchNorm groups of images."""
  deploy: bool = False
  dtype: Dtype = jnp.float32
  precision: Precision = None
  bn_groups: int = 1  # Training: BatchNorm statistics per group of images (batch_norm.py).

  def conv_bn(self, *args, **kwargs) -> 'ConvBN':
    """A ConvBN (arguments as ConvBN's) with this part's settings."""
    return ConvBN(*args, deploy=self.deploy, dtype=self.dtype, precision=self.precision,
                  bn_groups=self.bn_groups, **kwargs)

  def norm(self, train: bool, name: str, **kwargs) -> bn_lib.BatchNorm:
    """A BatchNorm (`batch_norm`) with this part's dtype and groups."""
    return batch_norm(train, self.dtype, name, groups=self.bn_groups, **kwargs)


class PointwiseConv(nn.Module):
  """A 1x1 conv (stride 1, no groups) computed as one matmul over the channels.

  The FFN's convs are such convs. XLA:CPU runs a convolution op through its generic conv kernel
  even for 1x1 windows; one dot is markedly faster there (and no slower on accelerators). The
  variables are those of `nn.Conv` (kernel (1, 1, I, O) HWIO, bias (O,)), initialized alike, so
  checkpoints and the importer see no difference. x's channels may be held as (C / S, S)
  (`split_channels`), and with `split` = S the output's are too.
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None
  split: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = math.prod(x.shape[3:])
    kernel, bias = conv_params(self, (1, 1, channels, self.features), self.use_bias)
    out_shape = (self.features,) if self.split is None else (
        self.features // self.split, self.split)
    y = jnp.tensordot(x.astype(self.dtype),
                      kernel.reshape(*x.shape[3:], *out_shape).astype(self.dtype),
                      axes=x.ndim - 3, precision=self.precision)
    return y if bias is None else y + bias.reshape(out_shape).astype(self.dtype)


def _shifted_views(x: jax.Array, k: int) -> list[jax.Array]:
  """The k*k views of the zero-padded x (N, H, W, ...) shifted by (dy, dx), row-major in (dy, dx)."""
  height, width = x.shape[1:3]
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p)) + ((0, 0),) * (x.ndim - 3))
  return [padded[:, dy:dy + height, dx:dx + width] for dy in range(k) for dx in range(k)]


def _shifted_products(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum over (dy, dx) of the zero-padded x shifted by (dy, dx), times kernel[dy, dx] (per channel).

  Args:
    x: (N, H, W, ..., C).
    kernel: (k, k, C), k odd.
  Returns:
    Like x: the 'same'-padded depthwise cross-correlation (over H and W, per channel).
  """
  k = kernel.shape[0]
  return sum(view * w for view, w in zip(_shifted_views(x, k), kernel.reshape(k * k, -1)))


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 'same'-padded, stride-1 depthwise conv of x (N, H, W, ..., C) with kernel (k, k, C).

  Its gradient is written out rather than derived: the input's is the same conv of the output
  gradient with the kernel flipped, the kernel's k*k float32 sums of a shifted input times the
  output gradient. Derived by autodiff, XLA recomputed the forward products inside each of the
  k*k kernel reductions (near-identical kernels per branch: slower to compile and to run).
  """
  return _shifted_products(x, kernel)


def _depthwise_conv_fwd(x, kernel):
  return _shifted_products(x, kernel), (x, kernel)


def _depthwise_conv_bwd(residuals, g):
  x, kernel = residuals
  k, c = kernel.shape[0], x.shape[-1]
  grad_x = _shifted_products(g, kernel[::-1, ::-1])
  # Accumulated in at least float32 whatever the compute dtype, as the BatchNorm statistics.
  sum_dtype = jnp.promote_types(g.dtype, jnp.float32)
  grad_kernel = jnp.stack([jnp.sum(view * g, axis=tuple(range(x.ndim - 1)), dtype=sum_dtype)
                           for view in _shifted_views(x, k)])
  return grad_x, grad_kernel.reshape(k, k, c).astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


class DepthwiseConv(nn.Module):
  """A stride-1, 'same'-padded k x k conv with one filter per channel, as k*k shifted products.

  The Local Perceptron's branches are such convs, often on one channel (S = 1) over many small
  maps: XLA:CPU's convolution kernel handles that shape poorly, forward and backward, while the
  k*k multiply-adds of shifted views vectorize well. The variables are those of `nn.Conv` with
  feature_group_count = channels (kernel (k, k, 1, C), bias (C,)), initialized alike. x may hold
  more axes before its channels (N, H, W, ..., C): each is convolved with the same filters.
  """
  kernel_size: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel, bias = conv_params(self, (k, k, 1, c), self.use_bias)
    y = depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype))
    return y if bias is None else y + bias.astype(self.dtype)


class ConvBN(Part):
  """Conv (no bias) then BatchNorm; in deploy form one conv with bias.

  x is (N, H, W, C), or for 1x1 and depthwise convs (N, H, W, C / S, S) (`split_channels`): a
  depthwise conv treats every axis before the last as positions; a 1x1 conv contracts both
  channel axes and, with `split` = S, returns its channels as (features / S, S).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  groups: int = 1
  split: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if (self.groups == self.features == x.shape[-1] and self.strides == 1
        and self.padding == self.kernel_size // 2):
      conv = functools.partial(DepthwiseConv, self.kernel_size, dtype=self.dtype,
                               precision=self.precision, name='conv')
    elif self.kernel_size == self.strides == 1 and self.padding == 0 and self.groups == 1:
      conv = functools.partial(PointwiseConv, self.features, dtype=self.dtype,
                               precision=self.precision, split=self.split, name='conv')
    else:
      # The stem's 4x4/4 and the downsampling 2x2/2 convs included: as convolutions, the TPU
      # compiler keeps the maps around them in layouts that the units' matmuls share (written
      # as patches and one dot, it transposed stage 0's maps: benchmarks/README.md, "The deploy
      # forward").
      conv = functools.partial(
          nn.Conv, self.features, (self.kernel_size,) * 2, strides=(self.strides,) * 2,
          padding=[(self.padding, self.padding)] * 2, feature_group_count=self.groups,
          dtype=self.dtype, precision=self.precision, name='conv')
    if self.deploy:
      return conv(use_bias=True)(x)
    y = conv(use_bias=False)(x)
    return self.norm(train, 'bn', channel_axes=2 if self.split else 1)(y)


class GlobalPerceptron(nn.Module):
  """Per-channel gate from the global average: pool -> fc1 -> ReLU -> fc2 -> sigmoid."""
  hidden: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array, pooled: jax.Array | None = None) -> jax.Array:
    g = jnp.mean(x, axis=(1, 2)) if pooled is None else pooled
    g = g.reshape(g.shape[0], -1)  # Channels held as (C / S, S): (N, C).
    channels = g.shape[-1]
    g = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, precision=self.precision, name='fc1')(g))
    g = nn.Dense(channels, dtype=self.dtype, precision=self.precision, name='fc2')(g)
    return nn.sigmoid(g)  # (N, C)


class RepMLPBlock(Part):
  """Global, Partition and Local Perceptrons of RepMLPNet.

  fc3 is a grouped FC: shareset s maps the h*w values of each of its rows with its own (h*w, h*w)
  matrix, stored as kernel (S, h*w in, h*w out). The conv branches `repconv{k}` are k x k
  convolutions with S groups of one channel over each h x w window.
  """
  channels: int
  h: int
  w: int
  sharesets: int
  reparam_conv_k: Sequence[int] = (1, 3)
  gp_hidden: int | None = None  # Default C // 4, as the official code.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               pooled: jax.Array | None = None) -> jax.Array:
    """Args: x (N, H, W, C), or one window (N, h, w, C/S, S) or (N, h*w, 1, C/S, S)
    (`split_channels`), returned alike; pooled: x's spatial mean when the caller has it cheaper."""
    s, hw = self.sharesets, self.h * self.w
    gate = GlobalPerceptron(self.gp_hidden or self.channels // 4, dtype=self.dtype,
                            precision=self.precision, name='gp')(x, pooled)
    # float32 params as nn.Dense's param_dtype, also under jax_enable_x64.
    fc3_kernel = self.param('fc3', nn.initializers.lecun_normal(in_axis=1, out_axis=2,
                                                                batch_axis=0), (s, hw, hw),
                            jnp.float32).astype(self.dtype)
    if x.ndim == 5 or (x.shape[1:3] == (self.h, self.w) and s == 1):
      out = self._one_window(x, fc3_kernel, train)
    elif x.shape[1:3] == (self.h, self.w):
      out = self._one_window(split_channels(x, s), fc3_kernel, train).reshape(x.shape)
    else:
      out = reassemble(self._windows(x, fc3_kernel, train))
    return out * gate.reshape(gate.shape[0], 1, 1, *out.shape[3:]).astype(out.dtype)

  def _one_window(self, x: jax.Array, fc3_kernel: jax.Array, train: bool) -> jax.Array:
    """The block on a map that is one window: (N, h, w, C) with one shareset, else
    (N, h, w, C/S, S) or (N, h*w, 1, C/S, S), returned alike.

    The official re-assembly is then the inverse of the partition, so nothing is permuted:
    fc3 contracts the spatial axes per shareset (channel r*S + s belongs to shareset s), fc3_bn
    and the conv branches treat the C/S rows as positions of their S channels.
    """
    n, h, w = x.shape[:3]
    s = self.sharesets
    if x.ndim == 4:  # The (h*w, h*w) kernel as it is stored: XLA:CPU copies a reshaped one.
      out = jnp.einsum('npc,pq->nqc', x.reshape(n, h * w, -1), fc3_kernel[0],
                       precision=self.precision).reshape(x.shape)
    else:
      out = jnp.einsum('nyxrs,syxvu->nvurs', x, fc3_kernel.reshape(s, h, w, h, w),
                       precision=self.precision)
    if self.deploy:
      bias = self.param('fc3_bias', nn.initializers.zeros, (s, h * w), jnp.float32)
      return out + bias.T.reshape(h, w, *(1,) * (x.ndim - 4), s).astype(self.dtype)
    # One shareset: its statistics and kernels are shared by every channel.
    as_rows = (lambda a: a[..., None]) if x.ndim == 4 else (lambda a: a)
    out = self.norm(train, 'fc3_bn')(as_rows(out))
    for k in self.reparam_conv_k:
      out = out + self.conv_bn(s, k, padding=k // 2, groups=s,
                               name=f'repconv{k}')(as_rows(x), train=train)
    return out.reshape(x.shape)

  def _windows(self, x: jax.Array, fc3_kernel: jax.Array, train: bool) -> jax.Array:
    """The block on partition rows (N, hp, wp, C/S, h, w, S), as the official code lays them."""
    s, hw = self.sharesets, self.h * self.w
    rows = partition(x, self.h, self.w, s)  # (N, hp, wp, C/S, h, w, S)
    lead = rows.shape[:4]
    flat = rows.reshape(*lead, hw, s)
    if s == 1:
      # One plain matmul. Written as a batched one, XLA transposes the whole (h*w, h*w) kernel
      # (3136^2 floats at 56 x 56) on every call rather than the rows.
      out = jnp.dot(flat.reshape(-1, hw), fc3_kernel[0], precision=self.precision)
      out = out.reshape(flat.shape)
    else:
      out = jnp.einsum('nijrps,spq->nijrqs', flat, fc3_kernel, precision=self.precision)
    if self.deploy:
      bias = self.param('fc3_bias', nn.initializers.zeros, (s, hw), jnp.float32)
      out = out + bias.T.astype(self.dtype)
      return out.reshape(rows.shape)
    # fc3_bn and the conv branches see the rows as (rows, h, w, S) maps.
    maps = rows.reshape(-1, self.h, self.w, s)
    out = self.norm(train, 'fc3_bn')(out.reshape(maps.shape))
    for k in self.reparam_conv_k:
      out = out + self.conv_bn(s, k, padding=k // 2, groups=s,
                               name=f'repconv{k}')(maps, train=train)
    return out.reshape(rows.shape)


class FFNBlock(Part):
  """conv1x1-BN -> GELU (exact erf) -> conv1x1-BN.

  x is (N, H, W, C), or (N, H, W, C/S, S) or (N, H*W, 1, C/S, S) (`split_channels`), returned
  alike. On the deploy form's merged maps (N, H*W, 1, C/S, S) the FFN contracts the channels as
  one C axis: the TPU compiler then computes fc1, GELU and fc2 in one fusion whose 4C-wide
  hidden map never reaches HBM (benchmarks/README.md, "The deploy forward"); elsewhere the two
  channel axes stay apart (`split_channels`).
  """
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    shape, channels = x.shape, math.prod(x.shape[3:])
    merged = self.deploy and x.ndim == 5 and x.shape[2] == 1
    split = x.shape[-1] if x.ndim == 5 and not merged else None
    if merged:
      x = x.reshape(*shape[:3], channels)
    x = self.conv_bn(self.hidden, 1, name='ffn_fc1')(x, train=train)
    x = nn.gelu(x, approximate=False)
    return self.conv_bn(channels, 1, split=split, name='ffn_fc2')(x, train=train).reshape(shape)


class RepMLPNetUnit(Part):
  """x + RepMLPBlock(prebn1(x)), then y + FFN(prebn2(y)); deploy: y + FFN(y), prebn2 in fc1.

  x is (N, H, W, C), or at one window (N, h, w, C/S, S) or (N, h*w, 1, C/S, S)
  (`split_channels`), returned alike.
  """
  channels: int
  h: int
  w: int
  sharesets: int
  reparam_conv_k: Sequence[int] = (1, 3)
  gp_hidden: int | None = None
  ffn_expand: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    channel_axes = x.ndim - 3
    prebn1 = self.norm(train, 'prebn1', channel_axes=channel_axes)
    y = prebn1(x)
    # In eval mode a BatchNorm is a per-channel affine map, which commutes with the spatial mean:
    # the Global Perceptron pools x itself, so prebn1(x) is never written out whole (XLA fuses it
    # into the partition copy).
    pooled = None if train else prebn1(jnp.mean(x, axis=(1, 2)))
    x = x + RepMLPBlock(self.channels, self.h, self.w, self.sharesets, self.reparam_conv_k,
                        self.gp_hidden, deploy=self.deploy, dtype=self.dtype,
                        precision=self.precision, bn_groups=self.bn_groups,
                        name='repmlp_block')(y, train=train, pooled=pooled)
    # The deploy form folds prebn2 into the FFN's fc1 (a BN before a linear op, no padding).
    y = x if self.deploy else self.norm(train, 'prebn2', channel_axes=channel_axes)(x)
    return x + FFNBlock(self.channels * self.ffn_expand, deploy=self.deploy, dtype=self.dtype,
                        precision=self.precision, bn_groups=self.bn_groups,
                        name='ffn_block')(y, train=train)
