"""The official evaluation preprocessing, defined once: torchvision Resize(int) + CenterCrop on PIL.

The authors' evaluation (and timm's, and mmpretrain's with its `backend='pillow'`) opens each
file with PIL, converts it to RGB, resizes the short side to `floor(size / crop_ratio)` with PIL's
bilinear filter (the long side scaled and truncated, as torchvision's `Resize(int)`), cuts the
central `size` x `size` square (offsets rounded, as `CenterCrop`), then normalizes.
`crop_ratio` 1.0 is the RepMLPNet evaluation (Resize(size) + CenterCrop(size)); 0.875 gives
Resize(256) + CenterCrop(224).

Both evaluation paths call `eval_pixels`: image files at inference
(`repmlp_jax.inference.image_files`) and the tf.data evaluation during training
(`repmlp_jax.data.preprocess.eval_image`, through `tf.numpy_function`), so they give the same
pixels. PIL and numpy only: no TensorFlow is imported here.
"""

import io
import math

import numpy as np
from PIL import Image

from repmlp_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


def short_side(size: int, crop_ratio: float) -> int:
  """The side the short side is resized to: floor(size / crop_ratio), as timm computes it.

  Args:
    size: the side of the center crop (the model's input).
    crop_ratio: the crop covers this fraction of the resized short side, in (0, 1].
  """
  if not 0.0 < crop_ratio <= 1.0:
    raise ValueError(f'crop_ratio must be in (0, 1]; got {crop_ratio}.')
  return math.floor(size / crop_ratio)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
  """Bilinear resize so that min(height, width) == short, keeping the aspect ratio.

  The long side is truncated, as torchvision's Resize(int) does; an image already of that size
  is returned as it is (PIL's resize would copy it unchanged).
  """
  width, height = image.size
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  if (new_w, new_h) == (width, height):
    return image
  return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """The central size x size square (offsets rounded as torchvision's CenterCrop)."""
  width, height = image.size
  if width < size or height < size:
    raise ValueError(f'Cannot center-crop {size}x{size} from a {width}x{height} image.')
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def eval_pixels(image: Image.Image, size: int, crop_ratio: float = 1.0) -> np.ndarray:
  """The official evaluation crop of a PIL image, before normalization.

  Args:
    image: any PIL image; converted to RGB (grey, palette and RGBA images work).
    size: the side of the model's input.
    crop_ratio: the crop covers this fraction of the resized short side (1.0: RepMLPNet's).
  Returns:
    (size, size, 3) uint8.
  """
  short = short_side(size, crop_ratio)
  image = center_crop(resize_short_side(image.convert('RGB'), short), size)
  return np.asarray(image, np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1], minus the ImageNet mean, divided by its std."""
  x = np.asarray(pixels, np.float32) / np.float32(255.0)
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def eval_pixels_of(image: bytes | np.ndarray, size: int, crop_ratio: float) -> np.ndarray:
  """`eval_pixels` of an encoded image (bytes) or a decoded uint8 (H, W, 1 or 3) array.

  The form in which tf.data hands images over (`tf.numpy_function`): encoded files are decoded
  by PIL, as the official evaluation does.
  """
  if isinstance(image, np.ndarray) and image.dtype == object:
    image = image.item()  # A scalar tf.string arrives as a 0-d object array when run eagerly.
  if isinstance(image, bytes):
    with Image.open(io.BytesIO(image)) as decoded:
      decoded.load()
      return eval_pixels(decoded, size, crop_ratio)
  image = np.asarray(image, np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return eval_pixels(Image.fromarray(image), size, crop_ratio)
