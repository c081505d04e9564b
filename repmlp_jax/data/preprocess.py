"""Per-image train and eval transforms (TensorFlow graph ops, used inside tf.data map).

Train, as the official recipe (torchvision/PIL semantics):
  RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3), bilinear) -> horizontal flip ->
  RandAugment (see randaugment.py) -> to [0, 1] -> normalize with the ImageNet mean/std.
Small data sets use the RepMLP paper's CIFAR recipe instead of the crop: resize to the training
size (a no-op for CIFAR), zero-pad by `pad` pixels, random crop back, optional flip.
Eval: the official evaluation, `eval_transform.eval_pixels` (torchvision's Resize(int) +
CenterCrop on PIL images: the shorter side to floor(image_size / crop_ratio), center crop
image_size), run through tf.numpy_function so that training evaluation and inference on files
give the same pixels; then normalize. crop_ratio 1.0 is the official RepMLPNet evaluation;
224/256 is mmpretrain's Resize(256) + CenterCrop(224).

Images arrive either encoded (JPEG/PNG/... bytes: tfds, image folders) or decoded uint8
(H, W, C) with C in {1, 3}. Training resizes in TensorFlow, bilinear with antialiasing, rounded
back to uint8 as PIL does, so RandAugment sees the same kind of image the original pipeline gave
it.
Randomness is stateless: each example carries its own seed (see input_pipeline.py).
"""

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from repmlp_jax.data import eval_transform
from repmlp_jax.data import randaugment
from repmlp_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How images become model inputs. Defaults: the official ImageNet recipe."""
  random_resized_crop: bool = True  # False: resize to the train size, then pad + random crop.
  scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range.
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w/h) range.
  pad: int = 0  # Zero padding before the random crop when random_resized_crop is False.
  flip: bool = True
  randaugment_layers: int = 2  # 0 turns RandAugment off.
  randaugment_levels: int = 15  # Levels drawn from range(15): the official `raug15`.
  crop_ratio: float = 1.0  # Eval: center crop side / resized shorter side.
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      raise ValueError(f'scale must satisfy 0 < min <= max <= 1, got {self.scale}.')
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f'ratio must satisfy 0 < min <= max, got {self.ratio}.')
    if not 0 < self.crop_ratio <= 1:
      raise ValueError(f'crop_ratio must be in (0, 1], got {self.crop_ratio}.')
    if self.pad < 0 or self.randaugment_layers < 0 or self.randaugment_levels < 1:
      raise ValueError('pad and randaugment_layers must be >= 0 and randaugment_levels >= 1.')


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Decoded uint8 (H, W, 1 or 3) -> (H, W, 3); gray images are repeated over channels."""
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def _decode(image: tf.Tensor) -> tf.Tensor:
  if image.dtype == tf.string:
    return tf.io.decode_image(image, channels=3, expand_animations=False)
  return _to_rgb(image)


def _image_shape(image: tf.Tensor) -> tf.Tensor:
  """(height, width) without decoding JPEG pixels when the input is an encoded JPEG."""
  if image.dtype != tf.string:
    return tf.shape(image)[:2]
  return tf.cond(tf.io.is_jpeg(image),
                 lambda: tf.image.extract_jpeg_shape(image)[:2],
                 lambda: tf.shape(_decode(image))[:2])


def _crop(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """Crops box = (top, left, height, width); decodes only the box for encoded JPEGs."""
  if image.dtype != tf.string:
    return tf.slice(_to_rgb(image), [box[0], box[1], 0], [box[2], box[3], 3])
  return tf.cond(
      tf.io.is_jpeg(image),
      lambda: tf.io.decode_and_crop_jpeg(image, box, channels=3),
      lambda: tf.slice(_decode(image), [box[0], box[1], 0], [box[2], box[3], 3]))


def random_resized_crop_box(shape: tf.Tensor, seed: tf.Tensor, *, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params, statelessly: (top, left, height, width).

  Ten tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that fits
  wins; if none fits, the largest center crop with aspect clamped to `ratio`.
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  tries = 10
  area = height * width * tf.random.stateless_uniform([tries], area_seed, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([tries], ratio_seed, math.log(ratio[0]),
                                              math.log(ratio[1])))
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  # Fallback: whole image, or its center crop when its aspect is outside `ratio`.
  image_aspect = width / height
  fallback_w = tf.where(image_aspect < ratio[0], width, tf.where(
      image_aspect > ratio[1], tf.round(height * ratio[1]), width))
  fallback_h = tf.where(image_aspect < ratio[0], tf.round(width / ratio[0]), height)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, crop_h[first], fallback_h)
  crop_w = tf.where(found, crop_w[first], fallback_w)
  # torch.randint(0, n + 1): uniform offsets; uniform() < 1 keeps them in range.
  top = tf.floor(tf.random.stateless_uniform([], top_seed) * (height - crop_h + 1))
  left = tf.floor(tf.random.stateless_uniform([], left_seed) * (width - crop_w + 1))
  top = tf.where(found, top, tf.floor((height - crop_h) / 2))
  left = tf.where(found, left, tf.floor((width - crop_w) / 2))
  return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def _resize_rows(rows: tf.Tensor, size: int, scale: tf.Tensor) -> tf.Tensor:
  """(n, m) -> float32 (size, m): ScaleAndTranslate's pass along the rows, alone.

  Seen as an image of height n, width 1 and m channels, the op's pass along the width is an exact
  copy (a single weight of 1), and its pass along the height adds up whole rows of m values.
  """
  n, m = tf.shape(rows)[0], tf.shape(rows)[1]
  out = tf.raw_ops.ScaleAndTranslate(
      images=tf.reshape(rows, [1, n, 1, m]), size=tf.constant([size, 1]),
      scale=tf.stack([scale, 1.0]), translation=tf.zeros([2]), kernel_type='triangle',
      antialias=True)
  return tf.reshape(out, [size, m])


def _resize_uint8(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  """tf.image.resize(image, size, 'bilinear', antialias=True) rounded to uint8, bit for bit.

  That resize is TF's ScaleAndTranslate: each output value is its kernel's weighted sum in
  float32, first along the height (whole rows at a time: fast), then along the width (one pixel
  at a time, three channels in the innermost loop: most of the cost). Here the width pass is
  the same row pass run on the transposed intermediate: the same weights, the same float32
  operations in the same order, so the same values, at about two thirds of the cost.
  """
  height, width, channels = tf.shape(image)[0], tf.shape(image)[1], image.shape[-1]
  out_height, out_width = size
  scale = (tf.constant([out_height, out_width], tf.float32)  # As tf.image.resize computes it.
           / tf.cast(tf.stack([height, width]), tf.float32))
  rows = _resize_rows(tf.reshape(image, [height, width * channels]), out_height, scale[0])
  columns = tf.transpose(tf.reshape(rows, [out_height, width, channels]), [1, 0, 2])
  out = _resize_rows(tf.reshape(columns, [width, out_height * channels]), out_width, scale[1])
  # Transposed back as float32: TF transposes float32 (oneDNN) faster than uint8. The kernel's
  # weights are non-negative and sum to 1 (to a few float32 ulps), so the values lie in
  # [0, 255.01) and rounding needs no clipping.
  out = tf.transpose(tf.reshape(out, [out_width, out_height, channels]), [1, 0, 2])
  return tf.cast(tf.round(out), tf.uint8)


def _normalize(image: tf.Tensor, p: Preprocess) -> tf.Tensor:
  """uint8 -> (x / 255 - mean) / std in float32.

  The mean and std are spelled out to the image's shape: TF's element-wise ops broadcasting a
  (3,) operand over (H, W, 3) are several times slower than the whole normalization otherwise.
  """
  image = tf.cast(image, tf.float32) / 255.0
  if image.shape.is_fully_defined():
    mean = tf.constant(np.broadcast_to(np.float32(p.mean), image.shape))
    std = tf.constant(np.broadcast_to(np.float32(p.std), image.shape))
  else:
    mean = tf.broadcast_to(tf.constant(p.mean), tf.shape(image))
    std = tf.broadcast_to(tf.constant(p.std), tf.shape(image))
  return (image - mean) / std


def train_image(image: tf.Tensor, seed: tf.Tensor, *, image_size: int, p: Preprocess) -> tf.Tensor:
  """One training image: encoded bytes or uint8 (H, W, C) -> float32 (size, size, 3), normalized.

  Args:
    image: encoded image bytes (scalar string) or decoded uint8 (H, W, 1 or 3).
    seed: stateless seed, int (2,): same seed, same augmentation.
    image_size: output side.
    p: the settings.
  """
  crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if p.random_resized_crop:
    box = random_resized_crop_box(_image_shape(image), crop_seed, scale=p.scale, ratio=p.ratio)
    image = _resize_uint8(_crop(image, box), (image_size, image_size))
  else:
    image = _decode(image)
    if image.shape[:2] != (image_size, image_size):
      image = _resize_uint8(image, (image_size, image_size))
    if p.pad:
      image = tf.pad(image, [[p.pad, p.pad], [p.pad, p.pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), crop_seed)
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  if p.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = randaugment.randaugment(image, augment_seed, num_layers=p.randaugment_layers,
                                  num_levels=p.randaugment_levels)
  return _normalize(image, p)


def eval_image(image: tf.Tensor, *, image_size: int, p: Preprocess) -> tf.Tensor:
  """One eval image: the official evaluation crop (`eval_transform`), normalized.

  Decoding, resizing and cropping run in PIL (tf.numpy_function), as in the official evaluation
  and in `repmlp_jax.inference.image_files`: the same file gives the same pixels on both paths.

  Args:
    image: encoded image bytes (scalar string) or decoded uint8 (H, W, 1 or 3).
    image_size: output side.
    p: the settings (crop_ratio, mean, std are used).
  """
  eval_transform.short_side(image_size, p.crop_ratio)  # A bad crop_ratio fails while tracing.
  pixels = tf.numpy_function(
      functools.partial(eval_transform.eval_pixels_of, size=image_size, crop_ratio=p.crop_ratio),
      [image], tf.uint8, stateful=False)
  return _normalize(tf.ensure_shape(pixels, (image_size, image_size, 3)), p)
