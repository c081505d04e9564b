"""Tests of the input pipeline: tfds (mocked), image folders, the embedded digits, transforms."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from repmlp_jax.data import input_pipeline
from repmlp_jax.data import preprocess
from repmlp_jax.train import experiment

_LOW = -np.array(preprocess.IMAGENET_MEAN) / np.array(preprocess.IMAGENET_STD)
_HIGH = (1 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
_SIZES = {'train': 21, 'validation': 13}  # The fake ImageNet; odd sizes exercise remainders.
# Building a pipeline with RandAugment costs ~0.5 s of graph setup per epoch; tests of the data
# order use crop and flip, whose seeds are plumbed exactly like RandAugment's.
_FAST = preprocess.Preprocess(randaugment_layers=0)


def _fake_imagenet_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """A mocked `_as_dataset` that, unlike tfds's default mock, honours sub-splits.

  Example i of split s is a JPEG with label i (+100 in validation), so labels identify examples.
  """
  del self, read_config, kwargs
  infos = {name: type('SplitInfo', (), {'num_examples': n, 'shard_lengths': [n]})
           for name, n in _SIZES.items()}
  spec = tfds.core.ReadInstruction.from_spec(split) if isinstance(split, str) else split
  images, labels = [], []
  for instruction in spec.to_absolute(infos):
    end = _SIZES[instruction.splitname] if instruction.to is None else instruction.to
    for i in range(instruction.from_ or 0, end):
      pixels = np.random.default_rng(i).integers(0, 256, (24 + i % 5, 30 + i % 7, 3), np.uint8)
      images.append(tf.io.encode_jpeg(pixels).numpy())
      labels.append(i + (100 if instruction.splitname == 'validation' else 0))
  ds = tf.data.Dataset.from_tensor_slices(
      {'image': np.array(images, dtype=object), 'label': np.array(labels, np.int64),
       'file_name': np.array([f'{n}.JPEG' for n in labels], dtype=object)})
  if decoders is None:
    ds = ds.map(lambda ex: {**ex, 'image': tf.io.decode_jpeg(ex['image'], channels=3)})
  return ds.apply(tf.data.experimental.assert_cardinality(len(labels)))


@pytest.fixture
def fake_imagenet():
  with tfds.testing.mock_data(num_examples=_SIZES['train'],
                              as_dataset_fn=_fake_imagenet_as_dataset):
    yield


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_normalized_images(images: np.ndarray, size: int) -> None:
  assert images.dtype == np.float32 and images.shape[1:] == (size, size, 3)
  assert np.all(images >= _LOW - 1e-5) and np.all(images <= _HIGH + 1e-5)
  assert images.std() > 0.1  # Real pixels, not padding.


def _train(name='imagenet2012', **kwargs):
  args = dict(train=True, batch_size=4, image_size=32, seed=0) | kwargs
  return input_pipeline.create_split(name, **args)


def test_imagenet_train_batches(fake_imagenet):
  info = input_pipeline.dataset_info('imagenet2012')
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 21, 13)
  config = common.get_config()
  config.global_batch_size = 4
  assert experiment.derive_steps(config, info.num_train_examples).per_epoch == 5
  batches = _take(_train(), 6)  # Crosses into the second epoch (5 steps of 4 of 21).
  for batch in batches:
    assert set(batch) == {'image', 'label'} and batch['label'].dtype == np.int32
    _assert_normalized_images(batch['image'], 32)
  first_epoch = np.concatenate([b['label'] for b in batches[:5]])
  assert len(set(first_epoch)) == 20 and set(first_epoch) <= set(range(21))  # No repeats.


def test_train_order_is_seeded_and_resumes_exactly(fake_imagenet):
  reference = _take(_train(preprocess=_FAST), 8)  # Epochs of 5 steps: crosses into the second.
  for a, b in zip(reference, _take(_train(preprocess=_FAST), 8)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = _take(_train(seed=1, preprocess=_FAST), 1)[0]
  assert not np.array_equal(reference[0]['label'], other['label'])
  assert not np.array_equal(reference[0]['image'], other['image'])
  # A fresh order every epoch.
  assert not all(np.array_equal(reference[i]['label'], reference[i + 5]['label']) for i in range(3))
  for start, steps in ((3, 5), (7, 1)):  # Inside the first epoch (and on), inside the second.
    resumed = _take(_train(start_step=start, preprocess=_FAST), steps)
    for a, b in zip(reference[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['label'], b['label'])
      np.testing.assert_array_equal(a['image'], b['image'])


def test_two_processes_read_disjoint_parts(fake_imagenet):
  seen = []
  for index in range(2):
    # 21 // 2 = 10 examples per process (one dropped): 2 steps of 5 per epoch.
    epoch = _take(_train(batch_size=5, process_index=index, process_count=2, preprocess=_FAST), 2)
    seen.append(set(np.concatenate([b['label'] for b in epoch])))
  assert len(seen[0]) == len(seen[1]) == 10
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] <= set(range(21))


def test_eval_pads_and_masks_every_example_exactly_once(fake_imagenet):
  labels = []
  for index in range(2):
    batches = list(input_pipeline.create_split(
        'imagenet2012', train=False, batch_size=4, image_size=32, process_index=index,
        process_count=2))
    assert len(batches) == 2  # ceil(13 / (2 * 4)): the same on both processes.
    for batch in batches:
      assert batch['mask'].dtype == bool and batch['image'].shape == (4, 32, 32, 3)
      _assert_normalized_images(batch['image'][batch['mask']], 32)
      assert np.all(batch['image'][~batch['mask']] == 0)
      labels.extend(batch['label'][batch['mask']])
  assert sorted(labels) == list(range(100, 113))


def test_eval_is_deterministic(fake_imagenet):
  args = dict(train=False, batch_size=8, image_size=32)
  first = list(input_pipeline.create_split('imagenet2012', **args))
  second = list(input_pipeline.create_split('imagenet2012', **args))
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_bfloat16_eval_images_are_the_float32_ones_rounded_as_jax_rounds_them(fake_imagenet):
  args = dict(train=False, batch_size=8, image_size=32)
  full = list(input_pipeline.create_split('imagenet2012', **args))
  half = list(input_pipeline.create_split('imagenet2012', **args, image_dtype='bfloat16'))
  for a, b in zip(full, half, strict=True):
    assert b['image'].dtype == jnp.bfloat16
    expected = np.asarray(jnp.asarray(a['image']).astype(jnp.bfloat16))
    np.testing.assert_array_equal(b['image'].view(np.uint16), expected.view(np.uint16))
    np.testing.assert_array_equal(b['mask'], a['mask'])
  with pytest.raises(ValueError, match="image_dtype must be 'float32' or 'bfloat16'; got 'int8'"):
    input_pipeline.create_split('imagenet2012', **args, image_dtype='int8')
  with pytest.raises(ValueError, match='Training images stay float32'):
    input_pipeline.create_split('imagenet2012', train=True, batch_size=8, image_size=32,
                                image_dtype='bfloat16')


def test_cifar10_with_tfds_mock():
  with tfds.testing.mock_data(num_examples=12):
    info = input_pipeline.dataset_info('cifar10')
    assert (info.num_classes, info.train_split, info.eval_split) == (10, 'train', 'test')
    first, second = _take(_train('cifar10'), 4), _take(_train('cifar10'), 4)
    other = _take(_train('cifar10', seed=3), 4)
    for a, b in zip(first, second):
      np.testing.assert_array_equal(a['image'], b['image'])
      _assert_normalized_images(a['image'], 32)
      assert a['label'].dtype == np.int32 and np.all((a['label'] >= 0) & (a['label'] < 10))
    assert not np.array_equal(first[0]['image'], other[0]['image'])
    batches = list(input_pipeline.create_split('cifar10', train=False, batch_size=5, image_size=32))
    assert [int(b['mask'].sum()) for b in batches] == [5, 5, 2]
    # Eval at the native size is the normalized image itself: resize and crop are identities.
    raw = next(iter(tfds.builder('cifar10').as_dataset(split='test')))['image'].numpy()
    expected = (raw / 255 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
    np.testing.assert_allclose(batches[0]['image'][0], expected, atol=1e-5)


def _write_image(path, color, size=(20, 26)):
  pixels = np.zeros(size + (3,), np.uint8)
  pixels[...] = color
  Image.fromarray(pixels).save(path)


def test_image_folder_reads_labels_from_class_folders(tmp_path):
  colors = {'cat': (250, 10, 10), 'dog': (10, 10, 250), 'emu': (10, 250, 10)}
  for split, count in (('train', 3), ('val', 2)):
    for name, color in colors.items():
      (tmp_path / split / name).mkdir(parents=True)
      for i in range(count):
        _write_image(tmp_path / split / name / f'{i}.{"png" if i % 2 else "jpg"}', color)
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  info = input_pipeline.dataset_info('image_folder', data_dir=str(tmp_path))
  assert info.class_names == ('cat', 'dog', 'emu')
  assert (info.num_train_examples, info.num_eval_examples) == (9, 6)
  batches = list(input_pipeline.create_split('image_folder', train=False, batch_size=4,
                                             image_size=16, data_dir=str(tmp_path)))
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert list(labels) == [0, 0, 1, 1, 2, 2]
  brightest_channel = images.mean(axis=(1, 2)).argmax(-1)  # red, blue, green per class
  np.testing.assert_array_equal(brightest_channel, np.array([0, 2, 1])[labels])
  train = _take(input_pipeline.create_split('image_folder', train=True, batch_size=3, image_size=16,
                                            data_dir=str(tmp_path)), 3)
  assert sorted(np.concatenate([b['label'] for b in train])) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_errors_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match='needs data_dir'):
    input_pipeline.dataset_info('image_folder')
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  _write_image(tmp_path / 'train' / 'a' / '0.png', (1, 2, 3))
  with pytest.raises(FileNotFoundError, match='val/<class>'):
    input_pipeline.dataset_info('image_folder', data_dir=str(tmp_path))


def test_digits_is_the_embedded_default():
  from sklearn import datasets
  info = input_pipeline.dataset_info('digits')
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1438, 359)
  batches = list(input_pipeline.create_split('digits', train=False, batch_size=128, image_size=32))
  assert len(batches) == 3 and sum(int(b['mask'].sum()) for b in batches) == 359
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, datasets.load_digits().target[4::5])  # Fixed split.
  _assert_normalized_images(batches[0]['image'], 32)
  first, again = (_take(_train('digits', batch_size=64), 2) for _ in range(2))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['image'].shape == (64, 32, 32, 3) and set(a['label']) <= set(range(10))
    # Gray digits: the three channels carry the same picture.
    np.testing.assert_allclose(a['image'][..., 0] * preprocess.IMAGENET_STD[0]
                               + preprocess.IMAGENET_MEAN[0],
                               a['image'][..., 1] * preprocess.IMAGENET_STD[1]
                               + preprocess.IMAGENET_MEAN[1], atol=1e-5)
  resumed = _take(_train('digits', batch_size=64, start_step=23), 1)  # 22 steps per epoch.
  uninterrupted = _take(_train('digits', batch_size=64), 24)[-1]
  np.testing.assert_array_equal(resumed[0]['label'], uninterrupted['label'])
  np.testing.assert_array_equal(resumed[0]['image'], uninterrupted['image'])


@pytest.mark.parametrize('name, hint', [
    ('cifar10', 'tfds build cifar10'),
    ('imagenet2012', 'downloads/manual'),
])
def test_missing_tfds_data_says_how_to_prepare_it(tmp_path, name, hint):
  with pytest.raises(FileNotFoundError, match=hint):
    input_pipeline.create_split(name, train=True, batch_size=2, image_size=32,
                                data_dir=str(tmp_path))


def test_bad_requests_raise_clear_errors():
  with pytest.raises(ValueError, match="Unknown data set 'mnist'.*image_folder"):
    input_pipeline.create_split('mnist', train=True, batch_size=2, image_size=32)
  with pytest.raises(ValueError, match='start_step is for training'):
    input_pipeline.create_split('digits', train=False, batch_size=2, image_size=32, start_step=3)
  with pytest.raises(ValueError, match='process_index'):
    input_pipeline.create_split('digits', train=True, batch_size=2, image_size=32,
                                process_index=2, process_count=2)
  with pytest.raises(ValueError, match='fewer than batch_size'):
    input_pipeline.create_split('digits', train=True, batch_size=4096, image_size=32)
  with pytest.raises(ValueError, match='has splits'):
    input_pipeline.create_split('digits', train=False, batch_size=8, image_size=32, split='val')


def test_random_resized_crop_box_follows_torchvision_bounds():
  boxes = np.array([preprocess.random_resized_crop_box(
      tf.constant([300, 400]), tf.constant([s, 1]), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)).numpy()
      for s in range(50)])
  top, left, height, width = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (top + height <= 300) & (left + width <= 400))
  area = height * width / (300 * 400)
  assert np.all((area > 0.07) & (area < 1.01))
  assert np.all((width / height > 0.74) & (width / height < 1.35))
  assert len({tuple(b) for b in boxes}) > 40
  # No box fits a 1 x 100 strip: the fallback is the center crop at the extreme aspect ratio.
  fallback = preprocess.random_resized_crop_box(tf.constant([1, 100]), tf.constant([0, 0]),
                                                scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
  np.testing.assert_array_equal(fallback, [0, 49, 1, 1])


def test_eval_resizes_shorter_side_then_center_crops():
  # Columns hold their index: the output's columns show which part of the image was kept.
  columns = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (128, 1, 3))
  image = tf.constant(columns)
  full = preprocess.eval_image(image, image_size=128, p=preprocess.Preprocess())
  cropped = preprocess.eval_image(image, image_size=112,
                                  p=preprocess.Preprocess(crop_ratio=112 / 128))
  to_pixels = lambda x: (x.numpy()[0, :, 0] * preprocess.IMAGENET_STD[0]
                         + preprocess.IMAGENET_MEAN[0]) * 255
  # crop_ratio 1: shorter side 128 is kept, the 256 wide image is cut to its middle 128 columns.
  np.testing.assert_allclose(to_pixels(full), np.arange(64, 192), atol=0.01)
  # 112 / 128: resize to 128 x 256 (unchanged) and crop the middle 112 columns.
  np.testing.assert_allclose(to_pixels(cropped), np.arange(72, 184), atol=0.01)


def test_normalization_is_exactly_the_float32_formula():
  # In tf.data, where it runs (tf.function graphs may be rewritten by grappler, eager is exact).
  image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), np.uint8)
  p = preprocess.Preprocess()
  expected = ((image.astype(np.float32) / np.float32(255) - np.float32(p.mean))
              / np.float32(p.std))
  static = tf.data.Dataset.from_tensors(image)
  dynamic = tf.data.Dataset.from_tensors(tf.io.encode_png(image)).map(  # A lossless decode.
      lambda png: tf.io.decode_png(png, channels=3))
  assert dynamic.element_spec.shape.as_list() == [None, None, 3]
  for ds in (static, dynamic):
    out = next(iter(ds.map(lambda x: preprocess._normalize(x, p)))).numpy()
    np.testing.assert_array_equal(out, expected)


def test_training_resize_is_exactly_tf_image_resize():
  # _resize_uint8 runs the antialiased bilinear resize as two row passes; the values must be
  # those of tf.image.resize, rounded, for up- and downscales of any shape, in tf.data and eagerly.
  rng = np.random.default_rng(0)
  shapes = [(1, 1), (1, 7), (6, 1), (2, 3), (37, 53), (151, 97), (224, 224), (300, 480),
            (500, 333), (801, 650)]
  sizes = [(224, 224), (8, 8), (1, 1), (32, 17), (5, 300)]
  cases = []
  for i, shape in enumerate(shapes):
    noise = rng.integers(0, 256, shape + (3,), np.uint8)
    smooth = np.array(Image.fromarray(rng.integers(0, 256, (3, 3, 3), np.uint8)).resize(
        shape[::-1], Image.BICUBIC))
    white = np.full(shape + (3,), 255, np.uint8)  # Weights summing above 1 must not overflow.
    for image in (noise, smooth, white):
      cases.append((image, sizes[i % len(sizes)]))
      cases.append((image, (224, 224)))

  def expected(image, size):
    resized = tf.image.resize(image, size, method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()

  for image, size in cases:
    want = expected(image, size)
    np.testing.assert_array_equal(preprocess._resize_uint8(tf.constant(image), size), want)
    ds = tf.data.Dataset.from_tensors(tf.io.encode_png(image)).map(  # Dynamic shape, as in use.
        lambda png, size=size: preprocess._resize_uint8(tf.io.decode_png(png, channels=3), size))
    np.testing.assert_array_equal(next(iter(ds)).numpy(), want, err_msg=f'{image.shape} {size}')
