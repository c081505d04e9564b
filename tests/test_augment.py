"""Tests of RandAugment (TF graph ops, checked against PIL) and Mixup/CutMix (JAX)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from repmlp_jax.data import mixup
from repmlp_jax.data import randaugment

# ---------------------------------------------------------------------------------------------
# RandAugment


def _test_image(height: int = 40, width: int = 48, low: int = 30, high: int = 220) -> np.ndarray:
  """A smooth, low-contrast uint8 image: every op changes it, interpolation stays tame."""
  coarse = np.random.default_rng(0).integers(low, high, (9, 12, 3)).astype(np.uint8)
  return np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize('name', randaugment.OP_NAMES)
def test_op_runs_in_graph_mode_and_keeps_shape_dtype(name):
  image = _test_image()

  @tf.function(input_signature=[tf.TensorSpec((40, 48, 3), tf.uint8),
                                tf.TensorSpec((), tf.float32)])
  def apply(x, level):
    return randaugment.apply_op(x, name, level, negate=tf.constant(True), seed=tf.constant([1, 2]))

  for level in (0.0, 9.0, 14.0):
    out = apply(tf.constant(image), tf.constant(level))
    assert out.dtype == tf.uint8 and out.shape == image.shape
  # Level 6 changes the low-contrast image under every op (level 5 is Color's identity, level
  # 9 Solarize's threshold lies above its brightest pixel).
  assert not np.array_equal(apply(tf.constant(image), tf.constant(6.0)).numpy(), image)


@pytest.mark.parametrize('name', randaugment.GEOMETRIC_OPS)
@pytest.mark.parametrize('negate', [False, True])
def test_geometric_ops_are_identity_at_level_zero(name, negate):
  image = _test_image()
  out = randaugment.apply_op(tf.constant(image), name, 0.0, negate=negate).numpy()
  np.testing.assert_array_equal(out, image)


def _pil_reference(name: str, image: Image.Image, level: float,
                   negate: bool = False) -> Image.Image:
  """The authors' randaug.py semantics, written against PIL (`negate`: the geometric ops' sign)."""
  factor = level / 10 * 1.8 + 0.1
  signed = -level if negate else level
  width, height = image.size
  affine = dict(resample=Image.BILINEAR, fillcolor=(128, 128, 128))
  return {
      'AutoContrast': lambda: ImageOps.autocontrast(image),
      'Equalize': lambda: ImageOps.equalize(image),
      'Invert': lambda: ImageOps.invert(image),
      'PosterizeTpu': lambda: ImageOps.posterize(image, int(level / 10 * 4)),
      'Solarize': lambda: ImageOps.solarize(image, int(level / 10 * 256)),
      'SolarizeAdd': lambda: image.point(
          [min(255, i + int(level / 10 * 110)) if i < 128 else i for i in range(256)] * 3),
      'Color': lambda: ImageEnhance.Color(image).enhance(factor),
      'Contrast': lambda: ImageEnhance.Contrast(image).enhance(factor),
      'Brightness': lambda: ImageEnhance.Brightness(image).enhance(factor),
      'Sharpness': lambda: ImageEnhance.Sharpness(image).enhance(factor),
      'Rotate': lambda: image.rotate(signed / 10 * 30, **affine),
      'ShearX': lambda: image.transform(image.size, Image.AFFINE,
                                        (1, signed / 10 * 0.3, 0, 0, 1, 0), **affine),
      'ShearY': lambda: image.transform(image.size, Image.AFFINE,
                                        (1, 0, 0, signed / 10 * 0.3, 1, 0), **affine),
      'TranslateXRel': lambda: image.transform(
          image.size, Image.AFFINE, (1, 0, signed / 10 * 0.45 * width, 0, 1, 0), **affine),
      'TranslateYRel': lambda: image.transform(
          image.size, Image.AFFINE, (1, 0, 0, 0, 1, signed / 10 * 0.45 * height), **affine),
  }[name]()


@pytest.mark.parametrize('name', [n for n in randaugment.OP_NAMES
                                  if n != 'Cutout' and n not in randaugment.GEOMETRIC_OPS])
@pytest.mark.parametrize('level', [3.0, 13.0])
def test_op_matches_pil(name, level):
  image = _test_image(low=0, high=256)
  expected = np.array(_pil_reference(name, Image.fromarray(image), level))
  np.testing.assert_array_equal(randaugment.apply_op(tf.constant(image), name, level).numpy(),
                                expected)


@pytest.mark.parametrize('name', randaugment.GEOMETRIC_OPS)
@pytest.mark.parametrize('level', [3.0, 13.0])
@pytest.mark.parametrize('negate', [False, True])
def test_geometric_op_matches_pil_with_either_sign(name, level, negate):
  image = _test_image(low=0, high=256)
  expected = np.array(_pil_reference(name, Image.fromarray(image), level, negate)).astype(int)
  out = randaugment.apply_op(tf.constant(image), name, level, negate=negate).numpy().astype(int)
  # Same sampling points; only pixels next to the filled border are interpolated differently.
  assert np.mean(np.abs(out - expected) <= 1) > 0.95


def _edge_case_images() -> list[np.ndarray]:
  """Images that exercise the table-driven ops' special cases."""
  rng = np.random.default_rng(1)
  full = rng.integers(0, 256, (24, 20, 3), np.uint8)
  flat_channel = full.copy()
  flat_channel[..., 1] = 77  # AutoContrast / Equalize leave a constant channel alone.
  two_values = np.where(rng.random((24, 20, 3)) < 0.9, 10, 200).astype(np.uint8)
  narrow = rng.integers(120, 124, (24, 20, 3), np.uint8)
  return [full, flat_channel, two_values, narrow]


@pytest.mark.parametrize('name', ['AutoContrast', 'Equalize', 'PosterizeTpu', 'Solarize',
                                  'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness'])
def test_pixel_ops_match_pil_at_every_level(name):
  # These ops are computed in exact integer or float arithmetic, lookup tables and matrix
  # products: exact at every level.
  levels = [0.0] if name in ('AutoContrast', 'Equalize') else [float(l) for l in range(15)]
  if name == 'PosterizeTpu':
    levels = levels[3:]  # Below 3 no bit is kept (a black image), which PIL refuses.
  for image in _edge_case_images():
    for level in levels:
      expected = np.array(_pil_reference(name, Image.fromarray(image), level))
      out = randaugment.apply_op(tf.constant(image), name, level).numpy()
      np.testing.assert_array_equal(out, expected, err_msg=f'{name} level {level}')


def _projective_reference(name: str, image: tf.Tensor, level: tf.Tensor,
                          negate: tf.Tensor) -> tf.Tensor:
  """The op computed by TF's projective transform (`_pil_affine`), pixel by pixel."""
  fraction = level / randaugment.MAX_LEVEL * (0.3 if name.startswith('Shear') else 0.45)
  value = randaugment._signed(fraction, negate)
  zero, one = tf.constant(0.0), tf.constant(1.0)
  matrix, offset = tf.eye(2), tf.zeros([2])
  if name == 'ShearX':
    matrix = tf.stack([tf.stack([one, value]), tf.stack([zero, one])])
  elif name == 'ShearY':
    matrix = tf.stack([tf.stack([one, zero]), tf.stack([value, one])])
  elif name == 'TranslateXRel':
    offset = tf.stack([value * tf.cast(tf.shape(image)[1], tf.float32), zero])
  else:
    offset = tf.stack([zero, value * tf.cast(tf.shape(image)[0], tf.float32)])
  return randaugment._pil_affine(image, matrix, offset)


@pytest.mark.parametrize('name', ['ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'])
def test_geometric_ops_equal_the_projective_transform(name):
  # Shears and translations are computed with gathers of rows or pixels; they must equal TF's
  # projective transform bit for bit, at every level, sign and size, both eagerly and inside
  # tf.data (whose graph optimizer rewrites arithmetic).
  rng = np.random.default_rng(3)
  levels = np.repeat(np.arange(15, dtype=np.float32), 2)
  negates = np.tile([False, True], 15)
  for shape in ((36, 44, 3), (45, 31, 3), (224, 224, 3)):
    image = tf.constant(rng.integers(0, 256, shape, np.uint8))
    cases = tf.data.Dataset.from_tensor_slices((levels, negates))
    expected = cases.map(lambda level, negate: _projective_reference(name, image, level, negate))
    out = cases.map(lambda level, negate: randaugment.apply_op(image, name, level, negate=negate))
    for i, (want, got) in enumerate(zip(expected.as_numpy_iterator(), out.as_numpy_iterator())):
      np.testing.assert_array_equal(got, want, err_msg=f'{name} {shape} level {levels[i]} '
                                                       f'negate {negates[i]} (tf.data)')
    for level, negate in zip(levels[::3], negates[::3]):
      want = _projective_reference(name, image, tf.constant(level), tf.constant(negate))
      got = randaugment.apply_op(image, name, float(level), negate=bool(negate))
      np.testing.assert_array_equal(got.numpy(), want.numpy(),
                                    err_msg=f'{name} {shape} level {level} negate {negate}')


def test_cutout_keeps_every_pixel_outside_the_hole():
  image = np.random.default_rng(2).integers(0, 100, (30, 26, 3), np.uint8)
  for level, seed in ((14.0, (1, 2)), (3.0, (5, 6)), (0.0, (7, 8))):
    out = randaugment.apply_op(tf.constant(image), 'Cutout', level, seed=seed).numpy()
    hole = np.all(out == randaugment.FILL, axis=-1)
    np.testing.assert_array_equal(out[~hole], image[~hole])
    rows, cols = np.nonzero(hole)
    assert hole.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= max(2, level * 4)


def test_cutout_fills_a_square_of_the_level_size():
  image = np.zeros((64, 64, 3), np.uint8)
  out = randaugment.apply_op(tf.constant(image), 'Cutout', 5.0, seed=(3, 4)).numpy()
  rows, cols = np.nonzero(out[..., 0] == randaugment.FILL)
  # Side max(2, 5/10*40) = 20, possibly clipped at the border.
  assert 0 < rows.max() - rows.min() + 1 <= 20 and 0 < cols.max() - cols.min() + 1 <= 20
  assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_randaugment_is_seeded_and_runs_in_tf_data():
  image = tf.constant(_test_image())
  ds = tf.data.Dataset.range(6).map(
      lambda i: randaugment.randaugment(image, tf.stack([tf.constant(7, tf.int64), i])))
  first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert all(a.shape == (40, 48, 3) and a.dtype == np.uint8 for a in first)
  assert len({a.tobytes() for a in first}) > 1
  np.testing.assert_array_equal(randaugment.randaugment(image, tf.constant([1, 2]), num_layers=0),
                                image)


def test_randaugment_runs_only_the_chosen_op_and_equals_eager():
  # The op choice stays a functional Case: lowered to Switch/Merge nodes, every node of all 16
  # branches would be visited for every image. Eagerly, the chosen op runs directly; both give
  # the same images.
  fn = tf.function(lambda x, s: randaugment.randaugment(x, s))
  graph = fn.get_concrete_function(tf.TensorSpec((40, 48, 3), tf.uint8),
                                   tf.TensorSpec((2,), tf.int64)).graph.as_graph_def()
  cases = [node for f in graph.library.function for node in f.node_def
           if node.op in ('Case', 'StatelessCase')]
  assert cases and all(not node.attr['_lower_using_switch_merge'].b for node in cases)
  image = tf.constant(_test_image())
  for i in range(12):
    seed = tf.constant([i, 3], tf.int64)
    np.testing.assert_array_equal(fn(image, seed), randaugment.randaugment(image, seed))


def test_unknown_op_name_is_rejected():
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    randaugment.apply_op(tf.zeros((8, 8, 3), tf.uint8), 'Blur', 1.0)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix


def _constant_batch(n: int = 8, size: int = 16) -> jax.Array:
  """Example i is filled with the value i, so every output pixel tells where it came from."""
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                          (n, size, size + 4, 3))


def _lambda_from_targets(targets: jax.Array, labels: jax.Array) -> np.ndarray:
  """With smoothing 0 and labels[i] != labels[-1-i], targets[i, labels[i]] is lambda."""
  return np.asarray(targets[jnp.arange(len(labels)), labels])


def test_mixup_only_blends_with_the_flipped_batch():
  images = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  labels = jnp.arange(6)
  out, targets = mixup.mixup_cutmix(jax.random.key(1), images, labels, num_classes=10,
                                    cutmix_alpha=0.0, label_smoothing=0.0)
  lam = _lambda_from_targets(targets, labels)
  assert np.allclose(lam, lam[0]) and 0 <= lam[0] <= 1
  np.testing.assert_allclose(out, lam[0] * images + (1 - lam[0]) * images[::-1], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize('seed', range(4))
def test_cutmix_area_matches_lambda(seed):
  images = _constant_batch()
  labels = jnp.arange(8)
  out, targets = mixup.mixup_cutmix(jax.random.key(seed), images, labels, num_classes=8,
                                    mixup_alpha=0.0, label_smoothing=0.0)
  out = np.asarray(out[..., 0])
  lam = _lambda_from_targets(targets, labels)
  for i in range(8):
    pasted = out[i] == 7 - i
    assert np.all(pasted | (out[i] == i))
    np.testing.assert_allclose(1 - pasted.mean(), lam[i], atol=1e-6)
    rows, cols = np.nonzero(pasted)
    if len(rows):  # The pasted region is one box.
      assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_targets_rows_sum_to_one_with_smoothing_and_lambda_bounds():
  labels = jnp.array([0, 3, 3, 9, 1, 2, 5, 4])
  smoothing, classes = 0.1, 10
  for seed in range(8):
    _, targets = mixup.mixup_cutmix(jax.random.key(seed), _constant_batch(), labels,
                                    num_classes=classes, label_smoothing=smoothing)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    assert float(targets.min()) >= smoothing / classes - 1e-7
    assert float(targets.max()) <= 1 - smoothing + smoothing / classes + 1e-7


def test_switch_prob_and_prob_select_the_method():
  images, labels = _constant_batch(), jnp.arange(8)
  for seed in range(3):
    key = jax.random.key(seed)
    cut, _ = mixup.mixup_cutmix(key, images, labels, num_classes=8, switch_prob=1.0)
    assert set(np.unique(cut[0])) <= {0.0, 7.0}  # CutMix copies pixels.
    blend, _ = mixup.mixup_cutmix(key, images, labels, num_classes=8, switch_prob=0.0)
    assert np.unique(blend[0]).size == 1 and 0 < float(blend[0, 0, 0, 0]) < 7
    same, targets = mixup.mixup_cutmix(key, images, labels, num_classes=8, prob=0.0,
                                       label_smoothing=0.2)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_allclose(targets, jax.nn.one_hot(labels, 8) * 0.8 + 0.2 / 8, atol=1e-7)


def test_jit_with_integer_or_one_hot_labels_and_strict_promotion():
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.array([1, 0, 3, 2])
  key = jax.random.key(5)
  jitted = jax.jit(lambda k, x, y: mixup.mixup_cutmix(k, x, y, num_classes=4))
  with jax.numpy_dtype_promotion('strict'):
    out, targets = jitted(key, images, labels)
    out_bf16, targets_hot = jitted(key, images.astype(jnp.bfloat16), jax.nn.one_hot(labels, 4))
  assert out.shape == images.shape and targets.shape == (4, 4)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(out_bf16.astype(jnp.float32), out, atol=0.05)
  np.testing.assert_allclose(targets_hot, targets, atol=1e-7)


@pytest.mark.parametrize('kwargs, message', [
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), 'not both 0'),
    (dict(mixup_alpha=-1.0), 'must be >= 0'),
    (dict(prob=1.5), 'prob must be in'),
    (dict(switch_prob=-0.1), 'switch_prob must be in'),
    (dict(label_smoothing=2.0), 'label_smoothing must be in'),
    (dict(num_classes=0), 'num_classes'),
])
def test_bad_arguments_raise(kwargs, message):
  args = dict(num_classes=4) | kwargs
  with pytest.raises(ValueError, match=message):
    mixup.mixup_cutmix(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), jnp.array([0, 1]), **args)


def test_bad_shapes_raise():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='labels must be'):
    mixup.mixup_cutmix(key, jnp.zeros((2, 4, 4, 3)), jnp.array([0, 1, 2]), num_classes=4)
  with pytest.raises(ValueError, match='labels must be'):
    mixup.mixup_cutmix(key, jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5)), num_classes=4)
  with pytest.raises(ValueError, match='images must be floating'):
    mixup.mixup_cutmix(key, jnp.zeros((2, 4, 4, 3), jnp.uint8), jnp.array([0, 1]), num_classes=4)
