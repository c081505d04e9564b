"""The official evaluation preprocessing: one definition, the same pixels on both paths.

Generated JPEG and PNG files of several sizes and aspect ratios (down- and up-scaled, grey, RGBA
and palette images) go through the training evaluation (tf.data: `input_pipeline.create_split`
on an image folder, i.e. `preprocess.eval_image`) and through inference
(`image_files.load_images`, what predict.py uses). Both must give identical float32 inputs:
tolerance 0 (both decode, resize and crop with the same PIL code and normalize uint8 pixels with
the same float32 operations).
"""

import numpy as np
import pytest
from PIL import Image

from repmlp_jax.data import eval_transform
from repmlp_jax.data import input_pipeline
from repmlp_jax.inference import image_files

# (width, height, PIL mode, format)
IMAGES = [(200, 150, 'RGB', 'JPEG'), (150, 230, 'RGB', 'JPEG'), (97, 61, 'RGB', 'JPEG'),
          (64, 64, 'L', 'JPEG'), (180, 120, 'RGB', 'PNG'), (70, 110, 'RGBA', 'PNG'),
          (129, 77, 'P', 'PNG'), (90, 90, 'L', 'PNG')]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """An image folder (train/ and val/ of one class) holding IMAGES, and the val paths in order."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  paths = []
  for split in ('train', 'val'):
    (root / split / 'a').mkdir(parents=True)
  for i, (w, h, mode, fmt) in enumerate(IMAGES):
    # Smooth content plus noise: edges and gradients that a resize filter acts on.
    small = (rng.random((max(h // 8, 2), max(w // 8, 2), 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    image = image.convert(mode) if mode != 'RGBA' else image.convert('RGBA')
    path = root / 'val' / 'a' / f'{i:02d}.{"jpg" if fmt == "JPEG" else "png"}'
    image.save(path, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    paths.append(str(path))
  Image.new('RGB', (8, 8)).save(root / 'train' / 'a' / 'x.png')
  return str(root), paths


def _tf_eval(root, size, crop_ratio, count):
  p = input_pipeline.default_preprocess('image_folder')
  p = type(p)(**{**p.__dict__, 'crop_ratio': crop_ratio})
  batches = list(input_pipeline.create_split('image_folder', train=False, batch_size=count,
                                             image_size=size, data_dir=root, preprocess=p))
  assert len(batches) == 1 and batches[0]['mask'].all()
  return batches[0]['image']


@pytest.mark.parametrize('size, crop_ratio', [(64, 1.0), (56, 0.875), (72, 0.9)])
def test_training_evaluation_and_inference_give_the_same_pixels(image_folder, size, crop_ratio):
  root, paths = image_folder
  from_tf = _tf_eval(root, size, crop_ratio, len(paths))
  from_files = image_files.load_images(paths, size, crop_ratio)
  assert from_tf.shape == from_files.shape == (len(paths), size, size, 3)
  assert from_tf.dtype == from_files.dtype == np.float32
  np.testing.assert_array_equal(from_tf, from_files)


def test_the_definition_is_torchvisions():
  # floor(size / crop_ratio), as timm and the authors' int(256 / 224 * size): 248 at 224 / 0.9.
  assert eval_transform.short_side(224, 0.9) == 248
  assert eval_transform.short_side(224, 224 / 256) == 256
  assert eval_transform.short_side(224, 1.0) == 224
  with pytest.raises(ValueError, match='crop_ratio'):
    eval_transform.short_side(224, 1.5)
  # Resize(int): the short side to the target, the long side scaled and truncated.
  image = Image.new('RGB', (500, 375))
  assert eval_transform.resize_short_side(image, 248).size == (330, 248)  # 248 * 500 / 375
  # CenterCrop rounds the offsets as torchvision (Python's round): 331 - 224 = 107 -> 54.
  columns = Image.fromarray((np.arange(331) % 256).astype(np.uint8)[None, :].repeat(248, 0))
  crop = np.asarray(eval_transform.center_crop(columns, 224))
  assert crop.shape == (224, 224) and crop[0, 0] == 54 and crop[12, 0] == 54
