"""Images/s of the evaluation input pipeline: the official PIL preprocessing vs TensorFlow's resize.

The training evaluation (`input_pipeline.create_split(..., train=False)`) decodes, resizes and
crops each image with PIL through `tf.numpy_function` (`repmlp_jax.data.eval_transform`), so that
it gives the pixels of the official evaluation and of inference on files. This measures what that
costs against a TensorFlow-only version of the same steps (`tf.io.decode_image` +
`tf.image.resize(antialias=True)`: different pixels, no Python per image) on generated JPEGs of
ImageNet validation sizes, in the same tf.data map (AUTOTUNE parallelism), alternating the two
candidates round by round.

    python -m benchmarks.eval_preprocessing                 # 256 images, 3 rounds, 224 / 0.875
    python -m benchmarks.eval_preprocessing --num-images 512 --rounds 5
"""

import argparse
import io
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from repmlp_jax.data import eval_transform  # noqa: E402
from repmlp_jax.data import preprocess  # noqa: E402

SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))  # (width, height), common in ImageNet val


def _jpegs(count: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    w, h = SIZES[i % len(SIZES)]
    small = Image.fromarray((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    small.resize((w, h), Image.BICUBIC).save(buffer, 'JPEG', quality=90)
    out.append(buffer.getvalue())
  return out


def _tensorflow_only(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
  """The same steps in TensorFlow ops (decode, short side, bilinear antialiased resize, crop)."""
  image = tf.io.decode_image(image, channels=3, expand_animations=False)
  short = eval_transform.short_side(size, crop_ratio)
  shape = tf.shape(image)[:2]
  new_shape = shape * short // tf.reduce_min(shape)
  image = tf.image.resize(image, new_shape, method='bilinear', antialias=True)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
  image = tf.ensure_shape(tf.slice(image, [top, left, 0], [size, size, 3]), (size, size, 3))
  image = tf.cast(image, tf.float32) / 255.0
  return (image - eval_transform.IMAGENET_MEAN) / eval_transform.IMAGENET_STD


def _images_per_second(files: list[bytes], fn, batch_size: int) -> float:
  ds = tf.data.Dataset.from_tensor_slices(files).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  start, count = time.perf_counter(), 0
  for batch in ds:
    count += int(batch.shape[0])
  return count / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num-images', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--crop-ratio', type=float, default=0.875)
  parser.add_argument('--batch-size', type=int, default=64)
  args = parser.parse_args(argv)
  files = _jpegs(args.num_images)
  p = preprocess.Preprocess(crop_ratio=args.crop_ratio)
  candidates = {
      'PIL (official, used)': lambda x: preprocess.eval_image(x, image_size=args.size, p=p),
      'TensorFlow only': lambda x: _tensorflow_only(x, args.size, args.crop_ratio),
  }
  rates = {name: [] for name in candidates}
  for name, fn in candidates.items():  # Warm-up: tracing and thread pools.
    _images_per_second(files[:args.batch_size], fn, args.batch_size)
  for _ in range(args.rounds):
    for name, fn in candidates.items():
      rates[name].append(_images_per_second(files, fn, args.batch_size))
  print(f'{args.num_images} JPEGs of {", ".join(f"{w}x{h}" for w, h in SIZES)} -> '
        f'{args.size} (crop_ratio {args.crop_ratio}), {os.cpu_count()} CPUs, median of '
        f'{args.rounds} rounds:')
  for name, values in rates.items():
    print(f'  {name:22s} {statistics.median(values):8.1f} images/s')


if __name__ == '__main__':
  main()
