"""Image files -> model inputs, with the official evaluation preprocessing (PIL and numpy).

The preprocessing itself is `repmlp_jax.data.eval_transform` (torchvision's Resize(int) +
CenterCrop on PIL images, then the ImageNet normalization), the same definition the training
evaluation uses, so a file gives the same input here as in `train.py`'s evaluation. crop_ratio
1.0 is the official RepMLPNet evaluation; 0.875 gives Resize(256) + CenterCrop(224). No
TensorFlow is needed.
"""

import os
from typing import Sequence

import numpy as np
from PIL import Image

from repmlp_jax.data import eval_transform


def preprocess_image(image: Image.Image, size: int, crop_ratio: float = 1.0) -> np.ndarray:
  """One PIL image -> a normalized (size, size, 3) float32 array.

  Args:
    image: any PIL image; converted to RGB (grey, palette and RGBA images work).
    size: the side of the model's input.
    crop_ratio: the crop covers this fraction of the resized short side (1.0: official eval).
  Returns:
    (size, size, 3) float32, normalized with the ImageNet mean and std.
  """
  return eval_transform.normalize(eval_transform.eval_pixels(image, size, crop_ratio))


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
