"""convert.py end to end through main(argv): import, reparam, export; errors that write nothing."""

import os

import numpy as np
import pytest
import torch

from repmlp_jax import model_io
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr

import convert  # pylint: disable=g-bad-import-order  (repository root, like train.py)


@pytest.fixture(name='torch_model')
def _torch_model():
  return tc.tiny_torch_model()


@pytest.fixture(name='training_file')
def _training_file(tmp_path, torch_model, monkeypatch):
  """The authors' training checkpoint layout, with a pickled config."""
  yacs = tc.FakeYacs(monkeypatch, tmp_path / 'config_code_ran')
  path = tmp_path / 'RepMLPNet-Tiny-train.pth'
  torch.save(tc.training_checkpoint(torch_model.state_dict(), yacs.config()), path)
  return path


def _listing(directory):
  return sorted(os.listdir(directory))


def test_import_with_reparam_then_export(tmp_path, torch_model, training_file, capsys):
  out, deploy_out = tmp_path / 'ckpt', tmp_path / 'ckpt_deploy'
  assert convert.main(['import', str(training_file), str(out), '--reparam', str(deploy_out)]) == 0
  printed = capsys.readouterr().out
  assert tc.TINY_NAME in printed and 'official' in printed and 'training' in printed
  assert not (tmp_path / 'config_code_ran').exists()

  x = tc.images()
  expected = tc.torch_logits(torch_model, x)
  tolerance = rounding.tolerance(torch_model, x)  # 8x the reference's own float32 rounding.
  model, variables = model_io.load_model(out)
  assert not model.deploy
  tc.assert_logits_match(expected, tc.flax_logits(model, variables, x), tolerance)
  deploy_model, deploy_variables = model_io.load_model(deploy_out)
  assert deploy_model.deploy
  tc.assert_logits_match(expected, tc.flax_logits(deploy_model, deploy_variables, x), tolerance)

  # Back to PyTorch: both forms load into the authors' models.
  assert convert.main(['export', str(out), str(tmp_path / 'train.pth')]) == 0
  back = torch.load(tmp_path / 'train.pth', weights_only=True)
  for k, v in torch_model.state_dict().items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  assert convert.main(['export', str(deploy_out), str(tmp_path / 'deploy.pth')]) == 0
  official = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES, deploy=True)
  official.load_state_dict(torch.load(tmp_path / 'deploy.pth', weights_only=True), strict=True)
  tc.assert_logits_match(expected, tc.torch_logits(official.eval(), x), tolerance)

  # The reparameterize tool on our own checkpoint gives the same deploy form.
  assert convert.main(['reparam', str(out), str(tmp_path / 'again')]) == 0
  again_model, again_variables = model_io.load_model(tmp_path / 'again')
  assert again_model == deploy_model
  tc.assert_logits_match(expected,
                         tc.flax_logits(again_model, again_variables, x), tolerance)


def test_reparam_tool_on_a_pytorch_file(tmp_path, torch_model, training_file):
  out = tmp_path / 'deploy'
  assert convert.main(['reparam', str(training_file), str(out)]) == 0
  model, variables = model_io.load_model(out)
  assert model.deploy
  x = tc.images()
  tc.assert_logits_match(tc.torch_logits(torch_model, x),
                         tc.flax_logits(model, variables, x), rounding.tolerance(torch_model, x))
  # A deploy-form input has nothing left to re-parameterize: refused, nothing written.
  code = convert.main(['reparam', str(out), str(tmp_path / 'twice')])
  assert code == 2 and not (tmp_path / 'twice').exists()


def test_errors_write_nothing(tmp_path, training_file, capsys):
  before = _listing(tmp_path)
  # Key mismatch: the wrong variant named. Each is a usage error (status 2).
  assert convert.main(['import', str(training_file), str(tmp_path / 'a'), '--model', 'b224']) == 2
  err = capsys.readouterr().err
  assert 'missing key(s)' in err and 'expected shape' in err
  # A file that would run code.
  evil = tmp_path / 'evil.pth'
  torch.save({'model': {}, 'x': _Payload(tmp_path / 'code_ran')}, evil)
  assert convert.main(['import', str(evil), str(tmp_path / 'b')]) == 2
  assert 'refused' in capsys.readouterr().err
  assert not (tmp_path / 'code_ran').exists()
  # A truncated file.
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(training_file.read_bytes()[:4096])
  assert convert.main(['import', str(cut), str(tmp_path / 'c')]) == 2
  assert 'truncated' in capsys.readouterr().err
  # Contradictory flags.
  assert convert.main(['import', str(training_file), str(tmp_path / 'd'), '--deploy', '--reparam',
                       str(tmp_path / 'e')]) == 2
  assert 'Use one of them' in capsys.readouterr().err
  # An existing output is never replaced.
  (tmp_path / 'taken').mkdir()
  assert convert.main(['import', str(training_file), str(tmp_path / 'taken')]) == 2
  assert 'already exists' in capsys.readouterr().err
  assert _listing(tmp_path / 'taken') == []
  assert _listing(tmp_path) == sorted(before + ['cut.pth', 'evil.pth', 'taken'])


def test_help_shows_examples(capsys):
  with pytest.raises(SystemExit) as info:
    convert.main(['--help'])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert 'convert.py import RepMLPNet-B224-train-acc80.32.pth' in out
  assert 'convert.py reparam' in out and 'convert.py export' in out


class _Payload:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)
