"""The authors' and mmpretrain's state_dicts saved as .safetensors: load_torch reads them as it reads
the .pth (same detection, checks and logits); convert.py's safetensors routes; bad files."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip('safetensors', reason="needs the hub extra: pip install 'repmlp-jax[hub]'")
from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top

import repmlp_jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from repmlp_jax.models.factory import create_model  # pylint: disable=g-import-not-at-top
from repmlp_jax.pytorch import files as torch_files  # pylint: disable=g-import-not-at-top
from repmlp_jax.pytorch import importer  # pylint: disable=g-import-not-at-top
from repmlp_jax.pytorch import mapping  # pylint: disable=g-import-not-at-top
from tests import torch_checkpoints as tc  # pylint: disable=g-import-not-at-top
from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top

import convert  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _save_both(state_dict, directory, stem):
  """The same state_dict as torch.save and as safetensors (the file name says nothing)."""
  pth, st = directory / f'{stem}.pth', directory / f'{stem}.weights'
  torch.save(state_dict, pth)
  safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(st))
  return pth, st


def test_t224_safetensors_gives_the_same_logits_as_the_pth(tmp_path):
  torch.manual_seed(0)
  torch_model = tr.randomize_bn_(tr.create_repmlpnet('RepMLPNet-T224'), seed=1).eval()
  pth, st = _save_both(torch_model.state_dict(), tmp_path, 'RepMLPNet-T224-train')
  model, variables = repmlp_jax.load_torch(pth)
  st_model, st_variables = repmlp_jax.load_torch(st)
  assert st_model == model == create_model('RepMLPNet-T224')
  x = tc.images(1, 224)
  logits = tc.flax_logits(st_model, st_variables, x)
  np.testing.assert_array_equal(logits, tc.flax_logits(model, variables, x))
  tc.assert_logits_match(tc.torch_logits(torch_model, x), logits)


@pytest.mark.parametrize('layout', ['official', 'mmpretrain', 'deploy', 'ddp'])
def test_tiny_layouts(tmp_path, layout):
  torch_model = tc.tiny_torch_model()
  sd = torch_model.state_dict()
  expected_model = create_model(tc.TINY_NAME, num_classes=tc.TINY_CLASSES)
  if layout == 'mmpretrain':
    sd = tr.to_mmpretrain_state_dict(sd)
  elif layout == 'deploy':
    torch_model = tc.tiny_torch_model(deploy=True)
    sd = torch_model.state_dict()
    expected_model = expected_model.clone(deploy=True)
  elif layout == 'ddp':
    sd = {'module.' + k: v for k, v in sd.items()}
  _, st = _save_both(sd, tmp_path, 'tiny')
  read = torch_files.read_torch_checkpoint(st)
  assert read.format == 'safetensors'
  assert read.stripped_prefix == ('module.' if layout == 'ddp' else '')
  result = importer.import_torch(st)
  assert result.layout == ('mmpretrain' if layout == 'mmpretrain' else 'official')
  assert result.model == expected_model
  x = tc.images()
  tc.assert_logits_match(tc.torch_logits(torch_model, x),
                         tc.flax_logits(result.model, result.variables, x))


def test_bad_safetensors_files(tmp_path):
  sd = tc.tiny_torch_model().state_dict()
  _, st = _save_both(sd, tmp_path, 'tiny')
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(st.read_bytes()[:len(st.read_bytes()) // 2])
  with pytest.raises(torch_files.CheckpointFileError, match='truncated'):
    repmlp_jax.load_torch(cut)
  with pytest.raises(torch_files.CheckpointFileError, match='no EMA entries'):
    repmlp_jax.load_torch(st, use_ema=True)
  partial = tmp_path / 'partial.safetensors'
  safetensors_torch.save_file({k: v for k, v in sd.items() if 'head' not in k}, str(partial))
  with pytest.raises(mapping.KeyMismatchError, match='missing key'):
    repmlp_jax.load_torch(partial, tc.TINY_NAME)


def test_convert_import_and_export_in_the_hub_layout(tmp_path, capsys):
  torch_model = tc.tiny_torch_model()
  pth, st = _save_both(torch_model.state_dict(), tmp_path, 'tiny')
  out, deploy_out = tmp_path / 'hub', tmp_path / 'hub_deploy'
  assert convert.main(['import', str(st), str(out), '--format', 'safetensors', '--reparam',
                       str(deploy_out), '--crop-ratio', '0.875']) == 0
  assert '(safetensors)' in capsys.readouterr().out
  x = tc.images()
  expected = tc.torch_logits(torch_model, x)
  for path, deploy in ((out, False), (deploy_out, True)):
    assert sorted(os.listdir(path)) == ['config.json', 'model.safetensors']
    model, variables = repmlp_jax.from_pretrained(path)
    assert model.deploy == deploy
    tc.assert_logits_match(expected, tc.flax_logits(model, variables, x))
  assert '"crop_ratio": 0.875' in (out / 'config.json').read_text()

  # An orbax checkpoint (from the .pth) exported to the hub layout.
  assert convert.main(['import', str(pth), str(tmp_path / 'orbax')]) == 0
  assert convert.main(['export', str(tmp_path / 'orbax'), str(tmp_path / 'exported'),
                       '--format', 'safetensors']) == 0
  model, variables = repmlp_jax.from_pretrained(tmp_path / 'exported')
  tc.assert_logits_match(expected, tc.flax_logits(model, variables, x))
  capsys.readouterr()

  # Errors write nothing: a truncated file, an existing output, --overwrite with safetensors.
  before = sorted(os.listdir(tmp_path))
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(st.read_bytes()[:1000])
  assert convert.main(['import', str(cut), str(tmp_path / 'a'), '--format', 'safetensors']) == 2
  assert 'truncated' in capsys.readouterr().err
  assert convert.main(['export', str(tmp_path / 'orbax'), str(out), '--format',
                       'safetensors']) == 2
  assert 'already exists' in capsys.readouterr().err
  assert convert.main(['import', str(st), str(tmp_path / 'b'), '--format', 'safetensors',
                       '--overwrite']) == 2
  assert 'never replaced' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == sorted(before + ['cut.safetensors'])
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
