"""The serialized deploy artifact: same logits as the module, any batch size, safe writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repmlp_jax
from repmlp_jax.inference import export
from repmlp_jax.inference import predictor as inference
from tests import helpers

# The artifact is the same float32 program as the module, compiled apart: they may differ by the
# model's float32 rounding (~1e-7 on the tiny variant, tests/test_reparam.py), times 8.
BOUND = 8e-7


@pytest.fixture(scope='module')
def predictor():
  model = repmlp_jax.create_model('_RepMLPNet-Tiny', num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = helpers.randomize_batch_norm(variables, seed=4)
  return inference.Predictor(model, variables, class_names=[str(i) for i in range(10)])


def test_exported_artifact_matches_module(predictor, tmp_path):
  path = export.save_exported(tmp_path / 'tiny.bin', export.export_predictor(predictor))
  restored = export.load_exported(path)  # Only jax from here on.
  assert restored.in_avals[0].shape[1:] == (32, 32, 3)
  rng = np.random.default_rng(0)
  apply = jax.jit(predictor.model.apply)
  for n in (1, 5):  # Symbolic batch: one artifact, several batch sizes.
    x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(restored.call(jnp.asarray(x)))
    expected = apply(predictor.variables, x)
    assert logits.shape == (n, 10)
    assert helpers.relative_error(expected, logits) <= BOUND


def test_fixed_batch_export(predictor):
  exported = export.export_predictor(predictor, batch_size=2)
  assert exported.in_avals[0].shape == (2, 32, 32, 3)
  x = np.ones((2, 32, 32, 3), np.float32)
  assert helpers.relative_error(predictor.logits(x), exported.call(x)) <= BOUND


def test_save_refuses_to_overwrite_and_load_errors(predictor, tmp_path):
  path = tmp_path / 'model.bin'
  path.write_bytes(b'precious')
  with pytest.raises(FileExistsError, match='already exists'):
    export.save_exported(path, export.export_predictor(predictor))
  assert path.read_bytes() == b'precious'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model.bin']  # No temporary left.
  with pytest.raises(ValueError, match='not a serialized jax.export artifact'):
    export.load_exported(path)
  with pytest.raises(FileNotFoundError, match='No exported model'):
    export.load_exported(tmp_path / 'absent.bin')
  # Missing parents are created, as `mkdir -p` would; a parent that is a file is refused.
  exported = export.export_predictor(predictor)
  assert export.save_exported(tmp_path / 'new' / 'dir' / 'model.bin', exported) == str(
      tmp_path / 'new' / 'dir' / 'model.bin')
  with pytest.raises(NotADirectoryError, match='is a file'):
    export.save_exported(path / 'model.bin', exported)
