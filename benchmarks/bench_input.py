r"""Speed of the input pipeline: images/s and images/s per core, training and evaluation.

    python -m benchmarks.bench_input                              # generated JPEG folder
    python -m benchmarks.bench_input --repeats 5 --json out.json
    python -m benchmarks.bench_input --image-dir <root with train/<class>/*, val/<class>/*>
    python -m benchmarks.bench_input --compare old_rj   # against another version (below)

--compare measures the same pipelines of other versions of the package in the same process,
interleaved with this one's (so that load falls on all alike), and prints this version's rate
per core over each other's. A version is any importable copy of the package under another
name, e.g. (the copy's absolute imports renamed):
    git archive <commit> repmlp_jax | tar -x -C /tmp/v && mv /tmp/v/repmlp_jax /tmp/v/old_rj
    sed -i 's/repmlp_jax[.]/old_rj./g; s/from repmlp_jax import/from old_rj import/g' \
      $(find /tmp/v/old_rj -name '*.py')
    PYTHONPATH=/tmp/v python -m benchmarks.bench_input --compare old_rj

Data: an image folder of ImageNet-like JPEGs generated once into --work-dir (sides drawn from
300..500 px, quality 90, smooth content plus noise so that they compress like photographs), or
your own folder. The same JPEGs are also served as tfds records (`imagenet2012` under
`tfds.testing.mock_data`), which is the path ImageNet takes: no file open per image.

Pipelines (`repmlp_jax.data.input_pipeline.create_split`, batch --batch-size, side
--image-size): `train_randaugment` (the official recipe), `train_no_randaugment` (crop + flip),
`eval` (resize + center crop), each from the folder, and `tfds_train_randaugment`.

Timing: the repeats run round-robin over the pipelines, so that load from other processes falls
on all of them alike; each builds the pipeline afresh, takes --warmup batches (tf.data's start-up
and autotuning), times the next --batches batches and drops the pipeline, so that nothing else
runs meanwhile. Reported per pipeline, medians over repeats:
- img_per_s: wall-clock images per second with all the cores this process may use;
- img_per_s_per_core: images per second of process CPU time (user + system), i.e. what one
  fully busy core delivers. This is the figure to size machines with (cores needed = step rate /
  img_per_s_per_core), and it is much less sensitive to other processes than the wall rate.
"""

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Iterator

import numpy as np

PIPELINES = ('train_randaugment', 'train_no_randaugment', 'eval', 'tfds_train_randaugment')


def make_image_folder(root: str, *, train: int, val: int, classes: int = 8,
                      seed: int = 0) -> str:
  """Writes ImageNet-like JPEGs to root/{train,val}/<class>/ unless already there."""
  from PIL import Image
  marker = os.path.join(root, f'.complete-{train}-{val}-{classes}-{seed}')
  if os.path.exists(marker):
    return root
  rng = np.random.default_rng(seed)
  for split, count in (('train', train), ('val', val)):
    for c in range(classes):
      os.makedirs(os.path.join(root, split, f'class{c:03d}'), exist_ok=True)
    for i in range(count):
      height, width = rng.integers(300, 501, 2)
      coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
      smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
      pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(
          os.path.join(root, split, f'class{i % classes:03d}', f'{i:06d}.jpg'), quality=90)
  open(marker, 'w').close()
  return root


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _tfds_mock(image_dir: str):
  """tfds.testing.mock_data serving the folder's train JPEGs as imagenet2012 records."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(image_dir, 'train'))
                 for f in files if f.endswith('.jpg'))
  images = np.array([open(p, 'rb').read() for p in paths], dtype=object)
  labels = np.arange(len(paths), dtype=np.int64) % 1000

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs  # Any split: the same records.
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.apply(tf.data.experimental.assert_cardinality(len(labels)))

  return tfds.testing.mock_data(num_examples=len(labels), as_dataset_fn=as_dataset)


def pipeline_makers(image_dir: str, *, batch_size: int, image_size: int,
                    input_pipeline=None, preprocess=None) -> dict[str, Callable[[], Iterator]]:
  """Functions that build a fresh batch iterator, by pipeline name.

  input_pipeline / preprocess: the modules to measure (default: this package's), so that two
  versions can be compared in one process.
  """
  if input_pipeline is None:
    from repmlp_jax.data import input_pipeline
  if preprocess is None:
    from repmlp_jax.data import preprocess
  no_randaugment = preprocess.Preprocess(randaugment_layers=0)
  folder = dict(data_dir=image_dir, batch_size=batch_size, image_size=image_size)

  def tfds_train():
    with _tfds_mock(image_dir):  # tfds is only consulted while the pipeline is built.
      return input_pipeline.create_split('imagenet2012', train=True, batch_size=batch_size,
                                         image_size=image_size)

  return {
      'train_randaugment': lambda: input_pipeline.create_split(
          'image_folder', train=True, **folder),
      'train_no_randaugment': lambda: input_pipeline.create_split(
          'image_folder', train=True, preprocess=no_randaugment, **folder),
      'eval': lambda: input_pipeline.create_split('image_folder', train=False, **folder),
      'tfds_train_randaugment': tfds_train,
  }


def measure(makers: dict[str, Callable[[], Iterator]], *, batch_size: int, batches: int,
            repeats: int, warmup: int) -> dict[str, dict]:
  """Round-robin timing; returns medians of img_per_s and img_per_s_per_core per pipeline.

  Each timing builds a fresh pipeline, takes `warmup` batches, then times `batches` more, and
  drops the pipeline: only the measured pipeline runs meanwhile, and since the consumer here is
  much faster than the pipeline its prefetch buffers stay empty, so the rate is the steady one.
  """
  samples = {name: [] for name in makers}
  for _ in range(repeats):
    for name, make in makers.items():
      iterator = make()
      for _ in range(warmup):
        next(iterator)
      wall, cpu = time.perf_counter(), _cpu_seconds()
      for _ in range(batches):
        next(iterator)
      wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
      del iterator
      samples[name].append((batches * batch_size / wall, batches * batch_size / cpu))
  return {name: {'img_per_s': statistics.median(s[0] for s in rows),
                 'img_per_s_per_core': statistics.median(s[1] for s in rows),
                 'samples': rows}
          for name, rows in samples.items()}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image-dir', default=None, help='your own folder (default: generated)')
  parser.add_argument('--work-dir', default='/tmp/repmlp_bench_input',
                      help='where the generated folder is written (reused when present)')
  parser.add_argument('--train-images', type=int, default=512)
  parser.add_argument('--val-images', type=int, default=512)
  parser.add_argument('--pipelines', nargs='+', default=list(PIPELINES), choices=PIPELINES)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--batches', type=int, default=10,
                      help='batches per timing (eval: at most val-images / batch-size - warmup)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2, help='batches before timing')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.add_argument('--compare', nargs='+', default=[], metavar='PACKAGE',
                      help='other importable versions of the package to measure alongside')
  args = parser.parse_args(argv)

  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  image_dir = args.image_dir or make_image_folder(
      args.work_dir, train=args.train_images, val=args.val_images)
  versions = {'repmlp_jax': pipeline_makers(image_dir, batch_size=args.batch_size,
                                            image_size=args.image_size)}
  for package in args.compare:
    versions[package] = pipeline_makers(
        image_dir, batch_size=args.batch_size, image_size=args.image_size,
        input_pipeline=importlib.import_module(f'{package}.data.input_pipeline'),
        preprocess=importlib.import_module(f'{package}.data.preprocess'))
  label = (lambda package, name: name) if not args.compare else (
      lambda package, name: f'{package}/{name}')
  results = measure({label(package, name): makers[name] for name in args.pipelines
                     for package, makers in versions.items()},
                    batch_size=args.batch_size, batches=args.batches, repeats=args.repeats,
                    warmup=args.warmup)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'{cores} cores, load average {load:.1f}, batch {args.batch_size}, '
        f'{args.image_size}px, tensorflow {tf.__version__}')
  width = max(26, *(len(name) for name in results))
  print(f'{"pipeline":{width}s} {"img/s":>8s} {"img/s per core":>15s} '
        f'{"cores for 1000 img/s":>21s}')
  for name, r in results.items():
    print(f'{name:{width}s} {r["img_per_s"]:8.1f} {r["img_per_s_per_core"]:15.1f} '
          f'{1000 / r["img_per_s_per_core"]:21.1f}')
  for package in args.compare:
    for name in args.pipelines:
      ratio = (results[label('repmlp_jax', name)]['img_per_s_per_core']
               / results[label(package, name)]['img_per_s_per_core'])
      print(f'{name}: repmlp_jax / {package} = {ratio:.2f} (img/s per core)')
  report = {'cores': cores, 'load_average': load, 'batch_size': args.batch_size,
            'image_size': args.image_size, 'tensorflow': tf.__version__, 'image_dir': image_dir,
            'pipelines': results}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main(sys.argv[1:])
