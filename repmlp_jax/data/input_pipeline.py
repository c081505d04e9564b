"""Input pipeline: data sets -> per-process numpy batches for a jax.sharding training loop.

    info = input_pipeline.dataset_info('imagenet2012', data_dir=d)
    train = input_pipeline.create_split('imagenet2012', train=True, batch_size=b, image_size=256,
                                        data_dir=d, seed=0, start_step=restored_step)
    batch = next(train)  # {'image': float32 (b, 256, 256, 3), 'label': int32 (b,)}
    for batch in input_pipeline.create_split('imagenet2012', train=False, batch_size=b,
                                              image_size=256, data_dir=d):
      ...                # eval batches also carry 'mask' (bool (b,)): False on padding

`batch_size` is per process: the global batch is batch_size * process_count, and each process
feeds its batch to `jax.make_array_from_process_local_data`. Entry points should hide GPUs/TPUs
from TensorFlow (`tf.config.set_visible_devices([], 'GPU')`) so it leaves the memory to JAX.

Data sets (`DATASETS`): 'imagenet2012', 'cifar10', 'cifar100' (tfds, prepared once with
`tfds build <name> --data_dir=<data_dir>`; ImageNet from its manual tars, README "Training"),
'image_folder' (`<data_dir>/train/<class>/*` and `<data_dir>/val/<class>/*`, classes sorted by
name) and 'digits' (scikit-learn's 1797 8x8 digits, built in; every fifth image is the test
split). ImageNet labels follow the sorted WordNet ids, as torchvision's ImageFolder.
data_dir may be a gs:// URL: tfds data sets take it as it is (tfds reads buckets through
TensorFlow's GCS client), image folders are listed through `repmlp_jax.storage`.

Sharding: each process reads its own slice, tfds.split_for_jax_process semantics (even split;
train drops the < process_count remainder so every process has the same number of steps).

Determinism and resumption: the training stream is a pure function of (data set, split, seed,
process_index, process_count, batch_size, preprocess, shuffle_buffer). Epoch e of process p
shuffles with seeds derived from (seed, e, p) and augments example i of that epoch with a
stateless seed derived from the same triple and i. An epoch is
`examples_per_process // batch_size` steps (the per-epoch remainder is dropped, as PyTorch's
drop_last). `create_split(..., start_step=k)` starts at epoch k // steps_per_epoch and skips
the already-consumed examples of that epoch before decoding, so the batches are exactly those
an uninterrupted run would have produced from step k on. With a tf.data service
(`data_service_address`, repmlp_jax.data.service) epochs hold the same examples but their order
depends on the workers' timing; `_service_epoch` says what that means for resuming.

Eval reads every example of the split exactly once: each process pads its slice with
mask=False examples up to ceil(num_examples / (process_count * batch_size)) batches, the same
count on every process.
"""

import dataclasses
import functools
import itertools
import math
import os
from typing import Iterator, Protocol

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from repmlp_jax import storage
from repmlp_jax.data import preprocess as pp

DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012', 'image_folder')
_TFDS_SPLITS = {'imagenet2012': ('train', 'validation'), 'cifar10': ('train', 'test'),
                'cifar100': ('train', 'test')}
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a data set before reading it."""
  name: str
  num_classes: int
  train_split: str
  eval_split: str
  num_train_examples: int  # All processes together.
  num_eval_examples: int
  class_names: tuple[str, ...] = dataclasses.field(repr=False)


def default_preprocess(name: str) -> pp.Preprocess:
  """The recipe each data set trains with unless the caller passes its own Preprocess.

  ImageNet and image folders: the official RepMLPNet recipe. CIFAR: the RepMLP paper's
  pad 4 + random crop + flip. Digits: pad + random crop (a shift of about one original
  pixel), no flip (mirrored digits are other shapes).
  """
  _check_name(name)
  if name.startswith('cifar'):
    return pp.Preprocess(random_resized_crop=False, pad=4, randaugment_layers=0)
  if name == 'digits':
    return pp.Preprocess(random_resized_crop=False, pad=4, flip=False, randaugment_layers=0)
  return pp.Preprocess()


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(
        f'Unknown data set {name!r}; choose one of {DATASETS}. For your own images use '
        "name='image_folder' with data_dir=<root> holding train/<class>/* and val/<class>/*.")


def _even_range(n: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of slice `index` of `count`, exactly as tfds.even_splits cuts n examples."""
  per = n // count
  start, end = per * index, per * (index + 1)
  if not drop_remainder:
    start += min(index, n % count)
    end += min(index + 1, n % count)
  return start, end


class _Source(Protocol):
  """Where records come from. Records are {'image': bytes | path | uint8 array, 'label'}."""
  info: DatasetInfo

  def count(self, split: str, *, process_index: int, process_count: int,
            drop_remainder: bool) -> int:
    ...

  def read(self, split: str, *, process_index: int, process_count: int, drop_remainder: bool,
           shuffle_seed: int | None, shuffle_buffer: int,
           split_by_service: bool = False) -> tf.data.Dataset:
    """split_by_service: the tf.data service splits the result among its workers."""
    ...

  def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Turns a record into {'image': encoded bytes or uint8, 'label'}; runs after skipping."""
    ...


class _TfdsSource:
  """A prepared tfds data set; images stay encoded until the crop (cheap skip, JPEG crop)."""

  def __init__(self, name: str, data_dir: str | None):
    self._name = name
    self._builder = tfds.builder(name, data_dir=data_dir)
    train_split, eval_split = _TFDS_SPLITS[name]
    label = self._builder.info.features['label']
    self.info = DatasetInfo(
        name=name, num_classes=label.num_classes, train_split=train_split,
        eval_split=eval_split, num_train_examples=self._cardinality(train_split),
        num_eval_examples=self._cardinality(eval_split), class_names=tuple(label.names))

  def _as_dataset(self, split: tfds.typing.SplitArg, **kwargs) -> tf.data.Dataset:
    try:
      return self._builder.as_dataset(
          split=split, decoders={'image': tfds.decode.SkipDecoding()}, **kwargs)
    except AssertionError as e:  # tfds's way of saying the data was never built.
      if 'could not find data' not in str(e):
        raise
      raise FileNotFoundError(self._missing_message()) from e

  def _missing_message(self) -> str:
    root = self._builder.data_dir_root
    if self._name == 'imagenet2012':
      how = (f'tfds cannot download ImageNet. Put ILSVRC2012_img_train.tar and '
             f'ILSVRC2012_img_val.tar into {root}/downloads/manual/ and build once with '
             f'`tfds build imagenet2012 --data_dir={root}`')
    else:
      how = (f'Build it once on a machine with internet access with '
             f'`tfds build {self._name} --data_dir={root}` and copy that folder here')
    return (f'Data set {self._name!r} is not prepared in data_dir={str(root)!r}. {how}, '
            f'then pass data_dir={str(root)!r}.')

  def _cardinality(self, split: tfds.typing.SplitArg) -> int:
    n = int(self._as_dataset(split, shuffle_files=False).cardinality())
    if n < 0:
      raise ValueError(f'tfds did not report the size of {self._name} split {split!r}.')
    return n

  def count(self, split: str, *, process_index: int, process_count: int,
            drop_remainder: bool) -> int:
    return self._cardinality(tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder))

  def read(self, split: str, *, process_index: int, process_count: int, drop_remainder: bool,
           shuffle_seed: int | None, shuffle_buffer: int,
           split_by_service: bool = False) -> tf.data.Dataset:
    subsplit = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder)
    # A fresh dataset per epoch is read once, so tfds's automatic cache would only cost memory.
    # Split among service workers, each sees only some files: the count check would fail.
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                  assert_cardinality=not split_by_service)
    ds = self._as_dataset(subsplit, shuffle_files=shuffle_seed is not None,
                          read_config=read_config)
    ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
    if shuffle_seed is not None:
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
    return ds

  def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return record


class _ArraySource:
  """Examples held in memory: decoded images (digits) or image file paths (image folders)."""

  def __init__(self, info: DatasetInfo, splits: dict[str, tuple[np.ndarray, np.ndarray]],
               *, files: bool):
    self.info = info
    self._splits = splits
    self._files = files

  def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in self._splits:
      raise ValueError(f'{self.info.name} has splits {tuple(self._splits)}, not {split!r}.')
    return self._splits[split]

  def count(self, split: str, *, process_index: int, process_count: int,
            drop_remainder: bool) -> int:
    start, end = _even_range(len(self._split(split)[1]), process_index, process_count,
                             drop_remainder)
    return end - start

  def read(self, split: str, *, process_index: int, process_count: int, drop_remainder: bool,
           shuffle_seed: int | None, shuffle_buffer: int,
           split_by_service: bool = False) -> tf.data.Dataset:
    del shuffle_buffer, split_by_service  # The whole slice is permuted: it is in memory anyway.
    images, labels = self._split(split)
    order = np.arange(*_even_range(len(labels), process_index, process_count, drop_remainder))
    if shuffle_seed is not None:
      order = np.random.default_rng(shuffle_seed).permutation(order)
    return tf.data.Dataset.from_tensor_slices({'image': images[order], 'label': labels[order]})

  def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    if self._files:
      return {'image': tf.io.read_file(record['image']), 'label': record['label']}
    return record


def _digits_source() -> _ArraySource:
  from sklearn import datasets  # Only this data set needs scikit-learn.
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
  labels = digits.target.astype(np.int64)
  test = np.arange(len(labels)) % 5 == 4
  info = DatasetInfo(name='digits', num_classes=10, train_split='train', eval_split='test',
                     num_train_examples=int((~test).sum()), num_eval_examples=int(test.sum()),
                     class_names=tuple(str(d) for d in range(10)))
  return _ArraySource(info, {'train': (images[~test], labels[~test]),
                             'test': (images[test], labels[test])}, files=False)


def _image_folder_source(data_dir: str | None) -> _ArraySource:
  layout = '<data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image>'
  if data_dir is None:
    raise ValueError(f"name='image_folder' needs data_dir: a folder laid out as {layout}.")
  splits, class_names = {}, ()
  for split in ('train', 'val'):
    root = os.fspath(storage.resolve(data_dir) / split)  # Local or gs:// (tf.io reads both).
    if not storage.resolve(root).is_dir():
      raise FileNotFoundError(f'Image folder {root!r} does not exist; expected {layout}.')
    folders = sorted(entry.name for entry in storage.resolve(root).iterdir() if entry.is_dir())
    if split == 'train':
      class_names = tuple(folders)
    elif unknown := set(folders) - set(class_names):
      raise ValueError(f'{root!r} has classes missing from train: {sorted(unknown)}.')
    paths, labels = [], []
    for label, name in enumerate(class_names):
      folder = storage.resolve(root) / name
      if not folder.is_dir():
        continue
      for file in sorted(entry.name for entry in folder.iterdir()):
        if file.lower().endswith(_IMAGE_EXTENSIONS):
          paths.append(os.fspath(folder / file))
          labels.append(label)
    if not paths:
      raise FileNotFoundError(f'No images ({", ".join(_IMAGE_EXTENSIONS)}) under {root!r}; '
                              f'expected {layout}.')
    splits[split] = (np.array(paths), np.array(labels, np.int64))
  info = DatasetInfo(name='image_folder', num_classes=len(class_names), train_split='train',
                     eval_split='val', num_train_examples=len(splits['train'][1]),
                     num_eval_examples=len(splits['val'][1]), class_names=class_names)
  return _ArraySource(info, splits, files=True)


def _source(name: str, data_dir: str | None) -> _Source:
  _check_name(name)
  if name == 'digits':
    return _digits_source()
  if name == 'image_folder':
    return _image_folder_source(data_dir)
  return _TfdsSource(name, data_dir)


def dataset_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Classes, split names and sizes of a data set (raises if it is not available).

  Args:
    name: one of DATASETS.
    data_dir: tfds data dir (tfds data sets), root folder (image_folder); unused for digits.
  """
  return _source(name, data_dir).info


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed) of one epoch on one process; stable across versions."""
  words = np.random.SeedSequence([seed, epoch, process_index]).generate_state(2, np.uint32)
  return int(words[0]), int(words[1])


def create_split(
    name: str,
    *,
    train: bool,
    batch_size: int,
    image_size: int,
    split: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    start_step: int = 0,
    preprocess: pp.Preprocess | None = None,
    shuffle_buffer: int = 16_384,
    process_index: int | None = None,
    process_count: int | None = None,
    data_service_address: str | None = None,
    image_dtype: str = 'float32',
) -> Iterator[Batch]:
  """This process's batches of one split.

  Args:
    name: one of DATASETS.
    train: True: endless, shuffled, augmented stream (drop_remainder per epoch). False: one
      deterministic pass over the whole split, padded, with a 'mask'.
    batch_size: examples per batch on this process.
    image_size: output side (the train crop size, or the test size for eval).
    split: split name or tfds split spec; default: the data set's train or eval split.
    data_dir: tfds data dir (tfds data sets) or root folder (image_folder).
    seed: data order and augmentation seed (train only).
    start_step: train only: the number of batches already consumed; the stream resumes exactly.
    preprocess: transforms; default default_preprocess(name).
    shuffle_buffer: tf.data shuffle buffer after tfds file shuffling (in-memory data sets are
      fully permuted instead).
    process_index, process_count: this process and how many read the data; default jax's.
    data_service_address: train only: 'grpc://host:port' of a tf.data service dispatcher
      (repmlp_jax.data.service); the decoding and augmentation then run on its workers. See
      `_service_epoch` for what stays and what changes.
    image_dtype: eval only: 'float32', or the model's compute dtype ('bfloat16'), to which the
      normalized images are rounded as the model would round them (tf.cast rounds to nearest
      even, as XLA does): the same results, half the bytes to send and for the device to read.
      Training images stay float32: mixup and CutMix mix them before the model's cast.

  Returns:
    Iterator of dicts: 'image' (batch_size, image_size, image_size, 3) in `image_dtype`,
    normalized;
    'label' int32 (batch_size,); eval also 'mask' bool (batch_size,), False on padding.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {process_index}, '
                     f'{process_count}.')
  if batch_size < 1 or image_size < 1 or seed < 0 or start_step < 0:
    raise ValueError('batch_size and image_size must be >= 1, seed and start_step >= 0.')
  if not train and start_step:
    raise ValueError('start_step is for training; evaluation always reads the whole split.')
  if not train and data_service_address:
    raise ValueError('data_service_address is for training; evaluation runs locally.')
  if image_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"image_dtype must be 'float32' or 'bfloat16'; got {image_dtype!r}.")
  if train and image_dtype != 'float32':
    raise ValueError('Training images stay float32 (mixup and CutMix mix them before the '
                     "model's cast); image_dtype is for evaluation.")
  source = _source(name, data_dir)
  split = split or (source.info.train_split if train else source.info.eval_split)
  p = preprocess or default_preprocess(name)
  shard = dict(process_index=process_index, process_count=process_count)
  if not train:
    return _eval_batches(source, split, shard, batch_size=batch_size, image_size=image_size,
                         p=p, image_dtype=tf.dtypes.as_dtype(image_dtype))

  examples = source.count(split, **shard, drop_remainder=True)
  steps_per_epoch = examples // batch_size
  if not steps_per_epoch:
    raise ValueError(f'{name} {split!r} has {examples} examples per process, fewer than '
                     f'batch_size={batch_size}.')

  # Traced once and reused by every epoch's pipeline (RandAugment is slow to trace).
  train_image = tf.function(functools.partial(pp.train_image, image_size=image_size, p=p))

  def epoch_batches(epoch: int, skip: int) -> tf.data.Dataset:
    shuffle_seed, augment_seed = _epoch_seeds(seed, epoch, process_index)
    records = source.read(split, **shard, drop_remainder=True, shuffle_seed=shuffle_seed,
                          shuffle_buffer=shuffle_buffer,
                          split_by_service=bool(data_service_address))
    if data_service_address:
      return _service_epoch(records, source, train_image, augment_seed,
                            address=data_service_address, batch_size=batch_size,
                            steps=steps_per_epoch - skip // batch_size)

    def prepare(index: tf.Tensor, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      record = source.load(record)
      example_seed = tf.stack([tf.constant(augment_seed, tf.int64), index])
      return {'image': train_image(record['image'], example_seed),
              'label': tf.cast(record['label'], tf.int32)}

    # enumerate before skip: a resumed epoch gives each example the seed it had originally.
    ds = records.enumerate().skip(skip)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  first_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  # Built here, not in the generator, so that a broken setup raises at create_split time.
  first = epoch_batches(first_epoch, step_in_epoch * batch_size)

  def batches() -> Iterator[Batch]:
    yield from first.as_numpy_iterator()
    for epoch in itertools.count(first_epoch + 1):
      yield from epoch_batches(epoch, 0).as_numpy_iterator()

  return batches()


def _service_epoch(records: tf.data.Dataset, source: _Source, train_image, augment_seed: int, *,
                   address: str, batch_size: int, steps: int) -> tf.data.Dataset:
  """One epoch whose decoding and augmentation run on tf.data service workers.

  The dispatcher splits this process's records among the workers as they ask for work (dynamic
  sharding), so every example of the epoch is processed exactly once, but the order in which
  they arrive depends on the workers' timing. Hence:
  - each epoch holds the same examples as the local pipeline's (same shuffle seeds, same share
    of this process), batched in arrival order;
  - an example's augmentation seed comes from the epoch's seed and a fingerprint of the example
    (its file path or encoded bytes), not from its position, which no worker knows;
  - resuming at step k starts epoch k // steps_per_epoch afresh and takes only its remaining
    batches: epoch boundaries and the step count are those of the uninterrupted run, but the
    examples of the interrupted epoch's remaining batches are a timing-dependent subset of the
    epoch, not exactly the ones the interrupted run had not reached. Later epochs are whole.
  """

  def prepare(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    key = record['image']
    if key.dtype != tf.string:
      key = tf.io.serialize_tensor(key)
    fingerprint = tf.strings.to_hash_bucket_fast(key, 2**62)
    record = source.load(record)
    example_seed = tf.stack([tf.constant(augment_seed, tf.int64), fingerprint])
    return {'image': train_image(record['image'], example_seed),
            'label': tf.cast(record['label'], tf.int32)}

  ds = records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=address))
  return ds.batch(batch_size, drop_remainder=True).take(steps).prefetch(tf.data.AUTOTUNE)


def _eval_batches(source: _Source, split: str, shard: dict[str, int], *, batch_size: int,
                  image_size: int, p: pp.Preprocess, image_dtype: tf.DType) -> Iterator[Batch]:
  total = source.count(split, process_index=0, process_count=1, drop_remainder=False)
  examples = source.count(split, **shard, drop_remainder=False)
  # Same batch count on every process, so that all of them take part in every eval step.
  num_batches = math.ceil(total / (shard['process_count'] * batch_size))
  padding = num_batches * batch_size - examples
  if padding < 0:
    raise RuntimeError(f'{source.info.name} {split!r}: {examples} examples on this process but '
                       f'{total} in the split; the split sizes are inconsistent.')

  def prepare(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    record = source.load(record)
    image = pp.eval_image(record['image'], image_size=image_size, p=p)
    return {'image': tf.cast(image, image_dtype),
            'label': tf.cast(record['label'], tf.int32), 'mask': tf.constant(True)}

  ds = source.read(split, **shard, drop_remainder=False, shuffle_seed=None, shuffle_buffer=0)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  pad = {'image': tf.zeros((image_size, image_size, 3), image_dtype),
         'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
