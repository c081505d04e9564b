"""Inference: Predictor (tiny model and B224), preprocessing by hand, class names, CLI, errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import predict
import repmlp_jax
from repmlp_jax.data import eval_transform
from repmlp_jax.data import imagenet
from repmlp_jax.inference import predictor as inference
from repmlp_jax import model_io
from repmlp_jax.inference import image_files
from tests import fast_init
from tests import helpers
from tests import rounding

TINY = '_RepMLPNet-Tiny'


@pytest.fixture(scope='module')
def tiny():
  model = repmlp_jax.create_model(TINY, num_classes=1000)
  return model, fast_init.random_variables(model, (1, 32, 32, 3), seed=1)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).normal(size=(7, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def truth(tiny, images):
  """The tiny model's logits and stage features on `images` in float64 (tests/rounding.py)."""
  model, variables = tiny
  both = lambda m, v, x: (m.apply(v, x), repmlp_jax.extract_features(m, v, x))
  return rounding.flax_float64(model, variables, images, both)


def _bound(exact, *float32_outputs):
  """8x the float32 rounding of these outputs against the float64 truth (tests/rounding.py).

  Two float32 computations of one function (two forms, two batchings) differ by about the sum
  of their roundings; each output's rounding is measured here, the bound allows 8x the largest.
  """
  worst = max(helpers.relative_error(exact, out) for out in float32_outputs)
  return rounding.FACTOR * max(worst, rounding.FLOAT32_EPS)


def _probability_rtol(exact_logits, logit_bound):
  """Relative bound on each softmax probability from a relative bound on the logits.

  dp_i = p_i (dz_i - sum_j p_j dz_j), so |dp_i| <= 2 p_i max|dz|, and max|dz| <= bound * max|z|.
  """
  return 2 * logit_bound * np.abs(exact_logits).max()


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_predict_tiny_shapes_and_top_k_order(tiny, images, truth):
  model, variables = tiny
  predictor = inference.Predictor(model, variables, batch_size=4)
  classes, scores = predictor.predict(images, top_k=5)
  assert classes.shape == scores.shape == (7, 5)
  assert classes.dtype == np.int32 and scores.dtype == np.float32
  assert np.all(np.diff(scores, axis=1) <= 0)
  probs = _softmax(truth[0])  # Exact probabilities.
  np.testing.assert_array_equal(classes, np.argsort(-probs, axis=1)[:, :5])
  # Bound: 8x the float32 rounding of the Predictor's logits against float64, through the
  # softmax (here 5.8e-6 relative per probability); the scores are 3.9e-7 off.
  rtol = _probability_rtol(truth[0], _bound(truth[0], predictor.logits(images)))
  exact = np.take_along_axis(probs, classes, 1)
  np.testing.assert_allclose(scores, exact, rtol=rtol, atol=0)
  assert predictor.model.deploy  # Re-parameterized by default.


def test_partial_batches_compile_once_and_match(tiny, images, truth):
  predictor = inference.Predictor(*tiny, batch_size=4)
  all_logits = predictor.logits(images)  # Batches of 4 and 3 (padded).
  few = predictor.logits(images[:2])
  one = predictor.logits(images[5])  # A single (H, W, 3) image.
  assert predictor.num_traces == 1
  assert all_logits.shape == (7, 1000)
  # Bound: 8x the float32 rounding of these logits against float64 (here 2.1e-6). One
  # program on one batch shape: the rows come out bit-equal here.
  bound = _bound(truth[0], all_logits)
  assert helpers.relative_error(all_logits[:2], few) <= bound
  assert helpers.relative_error(all_logits[5], one[0]) <= bound


def test_deploy_and_training_forms_agree(tiny, images, truth):
  deploy = inference.Predictor(*tiny, batch_size=8)
  train = inference.Predictor(*tiny, batch_size=8, reparameterize_model=False)
  assert deploy.model.deploy and not train.model.deploy
  c_d, s_d = deploy.predict(images, top_k=3)
  c_t, s_t = train.predict(images, top_k=3)
  np.testing.assert_array_equal(c_d[:, 0], c_t[:, 0])
  # Bounds: 8x the larger float32 rounding of the two forms against float64; scores through the
  # softmax (here 7.7e-6 relative; the forms' scores are 3.6e-7 apart); features per stage
  # (9.5e-7 .. 1.2e-6; the forms 1.5e-7 .. 1.8e-7 apart).
  rtol = _probability_rtol(truth[0], _bound(truth[0], deploy.logits(images), train.logits(images)))
  np.testing.assert_allclose(s_d, s_t, rtol=rtol, atol=0)
  for exact, f_d, f_t in zip(truth[1], deploy.features(images), train.features(images)):
    assert f_d.shape == f_t.shape
    assert helpers.relative_error(f_t, f_d) <= _bound(exact, f_d, f_t)
  shapes = [f.shape for f in deploy.features(images[:2], out_indices=(0, 3))]
  assert shapes == [(2, 8, 8, 8), (2, 1, 1, 32)]


def test_bfloat16_close_to_float32(tiny, images):
  f32 = inference.Predictor(*tiny)
  bf16 = inference.Predictor(*tiny, dtype=jnp.bfloat16)
  dtypes = {a.dtype for a in jax.tree.leaves(bf16.variables['params'])}
  assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # BatchNorms: float32.
  l32, l16 = f32.logits(images), bf16.logits(images)
  assert l16.dtype == np.float32
  err = helpers.relative_error(l32, l16)
  assert 0 < err < 0.05, err  # Really computed in bfloat16, and still close.
  # The images go to the device in bfloat16, rounded on the host as jax rounds them there.
  # pylint: disable=protected-access
  batches = list(bf16._batches(bf16._check_images(images)))
  assert {b.dtype for b, _ in batches} == {jnp.dtype(jnp.bfloat16)}
  padded = np.concatenate([images, np.zeros_like(images[:1])])  # 7 images, batches of 8.
  cast_on_device = bf16._logits(bf16.variables, jnp.asarray(padded))
  np.testing.assert_array_equal(l16, np.asarray(cast_on_device)[:7])


# RepMLPNet-B224 with the variables and input of the test below, float32 against itself in
# float64 (relative, logits): training form 6.1e-7, deploy form 4.6e-7. Measured once (the float64
# B224 compile alone would add ~25 s to the test on CPU); BN scales 0.2..0.6 (fast_init) keep
# the activations bounded (helpers.randomize_batch_norm says why).
B224_ROUNDING = 6.1e-7


def test_b224_predict_random_weights():
  model = repmlp_jax.create_model('RepMLPNet-B224')
  variables = fast_init.random_variables(model, (1, 224, 224, 3), seed=2)
  x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
  deploy = inference.Predictor(model, variables, batch_size=2)
  train = inference.Predictor(model, variables, batch_size=2, reparameterize_model=False)
  c_d, s_d = deploy.predict(x, top_k=5)
  c_t, s_t = train.predict(x, top_k=5)
  assert c_d.shape == s_d.shape == (2, 5)
  assert np.all(np.diff(s_d, axis=1) <= 0)
  np.testing.assert_array_equal(c_d[:, 0], c_t[:, 0])
  # The reparam at full size: the deploy form's logits are the training form's to the sum of
  # both forms' float32 roundings (6.1e-7 + 4.6e-7); bound 8x the larger.
  logits_t = train.logits(x)
  assert helpers.relative_error(logits_t, deploy.logits(x)) <= rounding.FACTOR * B224_ROUNDING
  # Bound: 8x B224's float32 rounding through the softmax (here 1.6e-5 relative per score);
  # the two forms' scores are 2.4e-7 apart.
  rtol = _probability_rtol(logits_t, rounding.FACTOR * B224_ROUNDING)
  np.testing.assert_allclose(s_d, s_t, rtol=rtol, atol=0)
  assert deploy.class_names[0] == 'tench'


def test_preprocess_by_hand():
  # 40 wide, 20 high; each column holds its index, so the crop's position is visible.
  columns = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3))
  image = Image.fromarray(columns)
  resized = eval_transform.resize_short_side(image, 8)
  assert resized.size == (16, 8)  # Short side 8, long side 40 * 8 / 20.
  x = image_files.preprocess_image(image, 8)
  assert x.shape == (8, 8, 3) and x.dtype == np.float32
  # Center crop of a 16-wide map: columns 4..11; raw values back from the normalization.
  raw = np.asarray(resized, np.float64)[:, 4:12] / 255.0
  mean, std = np.array(imagenet.IMAGENET_MEAN), np.array(imagenet.IMAGENET_STD)
  # float32 arithmetic against the float64 truth: a few float32 ulps of the values' scale.
  bound = rounding.FACTOR * rounding.FLOAT32_EPS
  assert helpers.relative_error((raw - mean) / std, x) <= bound
  # crop_ratio 0.5: the short side goes to 16, the crop keeps the central 8 of 32 columns.
  assert eval_transform.resize_short_side(image, 16).size == (32, 16)
  assert image_files.preprocess_image(image, 8, crop_ratio=0.5).shape == (8, 8, 3)
  grey = Image.new('L', (8, 8), color=255)  # Converted to RGB; white is (1 - mean) / std.
  assert helpers.relative_error((1 - mean) / std, image_files.preprocess_image(grey, 8)[0, 0]
                                ) <= bound


def test_class_names():
  assert imagenet.imagenet_synsets()[:2] == ('n01440764', 'n01443537')
  names = imagenet.class_names(1000)
  assert len(names) == 1000 and names[0] == 'tench' and names[1] == 'goldfish'
  with pytest.warns(UserWarning, match='10 classes'):
    assert imagenet.class_names(10) == [str(i) for i in range(10)]


def test_clear_errors(tiny, tmp_path):
  predictor = inference.Predictor(*tiny, batch_size=2)
  with pytest.raises(ValueError, match='multiples of 32'):
    predictor.predict(np.zeros((1, 48, 48, 3), np.float32))
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    predictor.predict(np.zeros((1, 32, 32), np.float32))
  with pytest.raises(ValueError, match='image_size 40'):
    inference.Predictor(*tiny, image_size=40)
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not an image at all')
  with pytest.raises(ValueError, match='broken.jpg'):
    predictor.predict_files([broken])
  with pytest.raises(FileNotFoundError, match='missing.png'):
    predictor.predict_files([tmp_path / 'missing.png'])
  with pytest.raises(FileNotFoundError, match='No model at'):
    inference.Predictor.from_checkpoint(tmp_path / 'no_such_checkpoint')


def test_cli_classifies_files_and_exports(tiny, tmp_path, capsys):
  model, variables = tiny
  checkpoint = model_io.save_model(tmp_path / 'ckpt', model, variables)
  rng = np.random.default_rng(3)
  paths = []
  for name, size in (('a.png', (50, 40)), ('b.jpg', (32, 64))):
    path = os.fspath(tmp_path / name)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  out_file = tmp_path / 'tiny.bin'
  assert predict.main(['--checkpoint', checkpoint, *paths, '--top-k', '3',
                       '--export', os.fspath(out_file)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == paths[0] and lines[4] == paths[1]
  expected_classes, _ = inference.Predictor(model, variables).predict_files(paths, top_k=3)
  name = imagenet.class_names(1000)[expected_classes[0, 0]]
  assert lines[1].startswith('  1. ') and lines[1].endswith(f'{name} ({expected_classes[0, 0]})')
  assert out_file.is_file()
  # Errors: a message on stderr and status 2, no traceback; nothing overwritten.
  size = out_file.stat().st_size
  assert predict.main(['--checkpoint', checkpoint, '--export', os.fspath(out_file)]) == 2
  assert 'already exists' in capsys.readouterr().err and out_file.stat().st_size == size
  assert predict.main(['--checkpoint', os.fspath(tmp_path / 'nope'), paths[0]]) == 2
  assert 'No model at' in capsys.readouterr().err
  assert predict.main(['--checkpoint', checkpoint, '--image-size', '48', paths[0]]) == 2
  assert 'multiples of 32' in capsys.readouterr().err
