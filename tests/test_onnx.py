"""ONNX export: onnxruntime's logits equal JAX's (and the float64 truth) at batch 1 and 3 from one
file with a dynamic batch; v1 models and NCHW input; convert.py onnx; nothing overwritten."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('jax2onnx', reason="needs the onnx extra: pip install 'repmlp-jax[onnx]'")
pytest.importorskip('onnxruntime', reason="needs the onnx extra: pip install 'repmlp-jax[onnx]'")
onnx = pytest.importorskip('onnx', reason="needs the onnx extra: pip install 'repmlp-jax[onnx]'")

import repmlp_jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from repmlp_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
from tests import fast_init  # pylint: disable=g-import-not-at-top
from tests import helpers  # pylint: disable=g-import-not-at-top

import convert  # pylint: disable=g-import-not-at-top,g-bad-import-order

TINY = '_RepMLPNet-Tiny'
TOLERANCE = 1e-4  # Relative, float32 runtimes against each other and against float64.


def _model(name, size=32):
  model = repmlp_jax.create_model(name, num_classes=10)
  return model, fast_init.random_variables(model, (1, size, size, 3), seed=2)


def test_logits_equal_jax_and_float64_at_batch_1_and_3(tmp_path):
  model, variables = _model(TINY)  # Training form: re-parameterized by the export.
  path = repmlp_jax.export_onnx(model, variables, tmp_path / 'tiny.onnx')
  deploy_model, deploy_variables = repmlp_jax.reparam(model, variables)
  session = onnx_export.onnxruntime_session(path)
  forward = jax.jit(lambda v, x: deploy_model.apply(v, x))
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3), dtype=np.float32)
  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64)
    truth = np.asarray(jax.jit(lambda v, x: model64.apply(v, x))(
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables),
        jnp.asarray(images, jnp.float64)))
  jax_logits = np.asarray(forward(deploy_variables, images))
  for n in (1, 3):  # One file, two batch sizes.
    got = onnx_export.run_onnx(session, images[:n])
    assert got.shape == (n, 10)
    assert helpers.relative_error(jax_logits[:n], got) <= TOLERANCE
    assert helpers.relative_error(truth[:n], got) <= TOLERANCE

  proto = onnx.load(path)
  dims = proto.graph.input[0].type.tensor_type.shape.dim
  assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
  config = json.loads({p.key: p.value for p in proto.metadata_props}[onnx_export.METADATA_KEY])
  assert config['architecture'] == TINY and config['form'] == 'deploy'
  assert config['preprocessing']['layout'] == 'NHWC'


@pytest.mark.parametrize('name,size,nchw', [
    ('RepMLP-CIFAR-PureMLP', 32, True),  # v1 RepMLP blocks, NCHW input.
    ('_RepMLP-ResNet-Tiny', 64, False),  # v1 blocks in a ResNet (padded max-pool stem).
])
def test_v1_models(tmp_path, name, size, nchw):
  model, variables = _model(name, size)
  path = repmlp_jax.export_onnx(model, variables, tmp_path / 'v1.onnx', nchw=nchw)
  assert onnx_export.check_onnx(path, model, variables, nchw=nchw) <= TOLERANCE


def test_refuses_to_overwrite(tmp_path):
  model, variables = _model(TINY)
  taken = tmp_path / 'taken.onnx'
  taken.write_bytes(b'mine')
  with pytest.raises(FileExistsError, match='already exists'):
    repmlp_jax.export_onnx(model, variables, taken)
  assert taken.read_bytes() == b'mine'
  assert os.listdir(tmp_path) == ['taken.onnx']


def test_convert_onnx_from_a_hub_directory(tmp_path, capsys):
  pytest.importorskip('safetensors', reason="needs the hub extra: pip install 'repmlp-jax[hub]'")
  model, variables = _model(TINY)
  pretrained = repmlp_jax.save_pretrained(tmp_path / 'pretrained', model, variables)
  out = tmp_path / 'tiny.onnx'
  assert convert.main(['onnx', pretrained, str(out), '--check']) == 0
  printed = capsys.readouterr().out
  assert 'deploy form (reparam)' in printed and 'max relative difference' in printed
  difference = float(printed.rsplit('max relative difference ', 1)[1].split()[0])
  assert difference <= TOLERANCE
  # An existing output: one error, the file untouched.
  before = out.read_bytes()
  assert convert.main(['onnx', pretrained, str(out)]) == 2  # A usage error.
  assert 'already exists' in capsys.readouterr().err
  assert out.read_bytes() == before
