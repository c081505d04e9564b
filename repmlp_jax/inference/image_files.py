"""Evaluation preprocessing with PIL and numpy: resize, center crop, ImageNet normalization.

The official RepMLPNet evaluation (and mmpretrain's): resize so that the SHORT side equals
size / crop_ratio (bilinear, PIL's filter as torchvision uses it), center crop size x size, scale
to [0, 1], subtract the ImageNet mean and divide by its std. crop_ratio is 1.0 for the official
RepMLPNet numbers (resize to the test size, then crop); 0.875 gives mmpretrain's 224 recipe
(Resize(256) + CenterCrop(224)). No TensorFlow is needed at inference.
"""

import os
from typing import Sequence

import numpy as np
from PIL import Image

from repmlp_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
  """Bilinear resize so that min(height, width) == short, keeping the aspect ratio.

  The long side is truncated, as torchvision's Resize(int) does.
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


def preprocess_image(image: Image.Image, size: int, crop_ratio: float = 1.0) -> np.ndarray:
  """One PIL image -> a normalized (size, size, 3) float32 array.

  Args:
    image: any PIL image; converted to RGB (grey, palette and RGBA images work).
    size: the side of the model's input.
    crop_ratio: the crop covers this fraction of the resized short side (1.0: official eval).
  Returns:
    (size, size, 3) float32, normalized with the ImageNet mean and std.
  """
  if not 0.0 < crop_ratio <= 1.0:
    raise ValueError(f'crop_ratio must be in (0, 1]; got {crop_ratio}.')
  image = image.convert('RGB')
  image = resize_short_side(image, int(round(size / crop_ratio)))
  image = center_crop(image, size)
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def load_image(path: str | os.PathLike) -> Image.Image:
  """Opens an image file fully (so that a truncated or non-image file fails here, clearly)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'{path} is a directory; give image files (e.g. {path}/*.jpg).')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No image file at {path}.')
  try:
    with Image.open(path) as image:
      image.load()
      return image.copy()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL raises UnidentifiedImageError (an OSError) for non-images and OSError for truncation.
    raise ValueError(f'Cannot read {path!r} as an image ({type(e).__name__}: {e}). '
                     'Pass a JPEG, PNG or another format PIL reads.') from e


def load_images(paths: Sequence[str | os.PathLike], size: int,
                crop_ratio: float = 1.0) -> np.ndarray:
  """Reads and preprocesses image files into one (N, size, size, 3) float32 batch."""
  if not paths:
    raise ValueError('No image files given.')
  return np.stack([preprocess_image(load_image(p), size, crop_ratio) for p in paths])
