"""RepMLP-ResNet checkpoint files through load_torch, save_torch and convert.py."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert
import repmlp_jax
from repmlp_jax import model_io
from tests import helpers
from tests import rounding
from tests import torch_reference as tr

TINY = dict(num_blocks=(1, 2, 2, 1), num_classes=10, img_size=64, h=2, w=2, c3_groups=2,
            c4_groups=4, channels=(32, 64, 128, 256), stem_channels=16)


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  model = tr.randomize_bn_(tr.RepMLPResNet('light', **TINY), seed=3).eval()
  x = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    expected = model(x).numpy()
  # The bound of every float32 comparison with `expected` below: 8x the reference's own float32
  # rounding on x (its float32 logits against a float64 copy of itself, tests/rounding.py).
  # Measured: rounding 1.5e-7, so 1.2e-6; our logits (both forms, after export) 1.3e-7 .. 2.5e-7.
  tolerance = rounding.tolerance(model, x)
  return model, x, expected, tolerance


def _logits(model, variables, x):
  return np.asarray(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))


@pytest.mark.parametrize('form', ['train', 'deploy'])
def test_files_of_both_forms_load_and_match(tmp_path, reference, form):
  torch_model, x, expected, tolerance = reference
  sd = torch_model.state_dict() if form == 'train' else tr.deploy_state_dict(torch_model)
  path = tmp_path / 'resnet.pth'
  torch.save({'model': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 3}, path)
  model, variables = repmlp_jax.load_torch(path)
  assert model.deploy == (form == 'deploy') and model.kind == 'light'
  assert helpers.relative_error(expected, _logits(model, variables, x)) <= tolerance


def test_deploy_on_import_and_export_back(tmp_path, reference):
  torch_model, x, expected, tolerance = reference
  path = tmp_path / 'resnet.pth'
  torch.save(torch_model.state_dict(), path)
  model, variables = repmlp_jax.load_torch(path, deploy=True)
  assert model.deploy
  assert helpers.relative_error(expected, _logits(model, variables, x)) <= tolerance
  out = tmp_path / 'deploy.pth'
  repmlp_jax.save_torch(out, model, variables)
  official = tr.RepMLPResNet('light', **TINY, deploy=True)
  official.load_state_dict(torch.load(out, weights_only=True), strict=True)
  with torch.no_grad():
    assert helpers.relative_error(expected, official.eval()(x).numpy()) <= tolerance
  with pytest.raises(ValueError, match='only the official layout'):
    repmlp_jax.to_torch_state_dict(model, variables, layout='mmpretrain')


def test_convert_cli_imports_a_resnet(tmp_path, reference, capsys):
  torch_model, x, expected, tolerance = reference
  path = tmp_path / 'resnet.pth'
  torch.save(torch_model.state_dict(), path)
  assert convert.main(['import', str(path), str(tmp_path / 'flax')]) == 0
  assert 'RepMLP-ResNet' in capsys.readouterr().out
  model, variables = model_io.load_model(tmp_path / 'flax')
  assert helpers.relative_error(expected, _logits(model, variables, x)) <= tolerance


def test_a_named_model_that_does_not_fit_reports_every_key(reference):
  torch_model = reference[0]
  with pytest.raises(ValueError, match='missing key'):
    repmlp_jax.load_torch({k: v.numpy() for k, v in torch_model.state_dict().items()},
                          'RepMLP-ResNet50-Light')
