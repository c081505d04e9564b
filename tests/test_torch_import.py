"""Importing PyTorch checkpoints: logits equal PyTorch's for every layout, form and wrapper.

Golden checks against the PyTorch reference (tests/torch_reference.py): the tiny variant in every
layout, and RepMLPNet-B224 (official raw file, mmpretrain file, deploy-form file).
"""

import collections

import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax.models import repmlpnet
from repmlp_jax.pytorch import mapping
from repmlp_jax.pytorch import importer as torch_import
from repmlp_jax.pytorch import keys_repmlpnet as keys
from repmlp_jax.models.factory import create_model
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr


def _check_golden(model, variables, torch_model, x):
  # Bound: 8x the reference's own float32 rounding on x (tests/rounding.py), ~1e-6 here.
  tc.assert_logits_match(tc.torch_logits(torch_model, x),
                         tc.flax_logits(model, variables, x), rounding.tolerance(torch_model, x))


def _write(layout, torch_model, path, monkeypatch):
  """Saves `torch_model` in `layout`; returns (path, load_torch kwargs)."""
  sd = torch_model.state_dict()
  kwargs = {}
  if layout == 'raw':
    obj = sd
  elif layout == 'training_checkpoint':
    obj = tc.training_checkpoint(sd, tc.FakeYacs(monkeypatch, path.with_suffix('.ran')).config())
  elif layout == 'ddp_prefix':
    obj = {'model': collections.OrderedDict(('module.' + k, v) for k, v in sd.items())}
  elif layout == 'ema':
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # The non-EMA weights: not these.
    obj, kwargs = {'model': decoy, 'model_ema': sd, 'epoch': 3}, {'use_ema': True}
  elif layout.startswith('mmpretrain'):
    obj = {'state_dict': tr.to_mmpretrain_state_dict(sd), 'meta': {'epoch': 300}}
  else:
    raise AssertionError(layout)
  torch.save(obj, path, _use_new_zipfile_serialization=layout != 'mmpretrain_legacy')
  return path, kwargs


LAYOUTS = ['raw', 'training_checkpoint', 'ddp_prefix', 'ema', 'mmpretrain_zip',
           'mmpretrain_legacy']


@pytest.mark.parametrize('layout', LAYOUTS)
def test_tiny_training_form_in_every_layout(tmp_path, monkeypatch, layout):
  torch_model = tc.tiny_torch_model()
  path, kwargs = _write(layout, torch_model, tmp_path / 'tiny.pth', monkeypatch)
  result = torch_import.import_torch(path, **kwargs)
  assert result.model == create_model(tc.TINY_NAME, num_classes=tc.TINY_CLASSES)
  assert result.name == tc.TINY_NAME and not result.file_deploy
  assert result.layout == ('mmpretrain' if layout.startswith('mmpretrain') else 'official')
  _check_golden(result.model, result.variables, torch_model, tc.images())
  assert not path.with_suffix('.ran').exists()  # The pickled config ran no code.


@pytest.mark.parametrize('layout', ['raw', 'mmpretrain_zip'])
def test_tiny_deploy_form_file(tmp_path, monkeypatch, layout):
  torch_deploy = tc.tiny_torch_model(deploy=True)
  path, _ = _write(layout, torch_deploy, tmp_path / 'tiny_deploy.pth', monkeypatch)
  model, variables = repmlp_jax.load_torch(path)
  assert model == create_model(tc.TINY_NAME, num_classes=tc.TINY_CLASSES, deploy=True)
  # The BNs after the stem, downsampling and FFN convs were folded into the convs.
  assert set(variables['params']['conv_embedding']['conv']) == {'kernel', 'bias'}
  assert 'conv_embedding' not in variables['batch_stats']
  _check_golden(model, variables, torch_deploy, tc.images())


def test_deploy_true_reparameterizes_a_training_file():
  torch_model = tc.tiny_torch_model(seed=3)
  model, variables = repmlp_jax.load_torch(torch_model.state_dict(), deploy=True)
  assert model.deploy and 'fc3_bias' in variables['params']['stages_0_0']['repmlp_block']
  _check_golden(model, variables, torch_model, tc.images(seed=1))


def test_deploy_false_refuses_a_deploy_file():
  with pytest.raises(ValueError, match='cannot be turned back into the training form'):
    repmlp_jax.load_torch(tc.tiny_torch_model(deploy=True).state_dict(), deploy=False)


def test_given_name_and_short_spelling():
  torch_model = tc.tiny_torch_model()
  model, variables = repmlp_jax.load_torch(torch_model.state_dict(), '_repmlpnet_tiny')
  assert model == create_model(tc.TINY_NAME, num_classes=tc.TINY_CLASSES)
  _check_golden(model, variables, torch_model, tc.images())


def test_custom_settings_are_detected():
  # Three conv branches and mmpretrain's GP width rule (24, not 80 // 4, for 80 channels).
  torch_model = tc.tiny_torch_model(reparam_conv_k=(1, 3, 5), channels=(8, 16, 16, 80),
                                    gp_hidden=tr.mmpretrain_gp_hidden)
  expected = dict(reparam_conv_k=(1, 3, 5), channels=(8, 16, 16, 80), gp_hidden_divisor=8)
  result = torch_import.import_torch(torch_model.state_dict())
  assert result.name is None and 'custom' in result.describe()
  assert isinstance(result.model, repmlpnet.RepMLPNet)
  for k, v in expected.items():
    assert getattr(result.model, k) == v
  _check_golden(result.model, result.variables, torch_model, tc.images())


@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('name', sorted(tr.REPMLPNET_ARCHS))
def test_detects_every_official_variant(name, deploy):
  with torch.device('meta'):  # Shapes only.
    sd = tr.create_repmlpnet(name, num_classes=21, deploy=deploy).state_dict()
  assert keys.detect(sd) == (name, {'num_classes': 21}, deploy)
  # mmpretrain's GP width rule gives the same widths for these channels.
  assert keys.detect(keys.from_mmpretrain(tr.to_mmpretrain_state_dict(sd)))[0] == name


def test_mmpretrain_renames_match_the_reference():
  sd = tc.tiny_torch_model().state_dict()
  mm = tr.to_mmpretrain_state_dict(sd)
  assert list(keys.to_mmpretrain(sd)) == list(mm)
  assert list(keys.from_mmpretrain(mm)) == list(sd)


def test_key_mismatch_is_reported_in_full():
  sd = {k: v.numpy() for k, v in tc.tiny_torch_model().state_dict().items()}
  del sd['stages.1.0.prebn2.running_var']
  del sd['embeds.0.bn.weight']
  sd['stages.0.0.repmlp_block.extra.weight'] = np.zeros(3, np.float32)
  sd['head.bias'] = np.zeros(11, np.float32)
  with pytest.raises(mapping.KeyMismatchError) as info:
    repmlp_jax.load_torch(sd)
  err = info.value
  assert sorted(err.missing) == ['embeds.0.bn.weight', 'stages.1.0.prebn2.running_var']
  assert err.unexpected == ['stages.0.0.repmlp_block.extra.weight']
  assert err.misshaped == [('head.bias', (10,), (11,))]
  for key in ('embeds.0.bn.weight', 'stages.1.0.prebn2.running_var', 'extra.weight', 'head.bias'):
    assert key in str(err)


def test_wrong_name_is_reported_in_full():
  sd = tc.tiny_torch_model().state_dict()
  with pytest.raises(mapping.KeyMismatchError) as info:
    repmlp_jax.load_torch(sd, 'b224')
  err = info.value
  assert 'stages.2.11.prebn1.weight' in err.missing  # B224's third stage has 12 blocks.
  assert ('conv_embedding.conv.weight', (96, 3, 4, 4), (8, 3, 4, 4)) in err.misshaped
  assert 'the file holds _RepMLPNet-Tiny (training form), which loads without a name' in str(err)


def test_detection_errors():
  sd = {k: v.numpy() for k, v in tc.tiny_torch_model().state_dict().items()}
  with pytest.raises(keys.DetectionError, match='Not a RepMLPNet'):
    keys.detect({'fc.weight': np.zeros((2, 2))})
  mixed = dict(sd)
  mixed['stages.2.1.repmlp_block.fc3.bias'] = np.zeros(4 * 4, np.float32)
  with pytest.raises(keys.DetectionError, match='mix'):
    keys.detect(mixed)
  odd = dict(sd)
  odd['stages.0.0.repmlp_block.fc3.weight'] = np.zeros((2 * 8, 8, 1, 1), np.float32)
  with pytest.raises(keys.DetectionError, match='Ambiguous window'):
    keys.detect(odd)
  gapped = {k: v for k, v in sd.items() if not k.startswith('stages.2.0.')}
  with pytest.raises(keys.DetectionError, match='missing'):
    keys.detect(gapped)


def test_b224_golden(tmp_path):
  """RepMLPNet-B224: the official raw file, mmpretrain's file and a deploy-form file."""
  torch.manual_seed(0)
  torch_model = tr.randomize_bn_(tr.create_repmlpnet('RepMLPNet-B224'), seed=1).eval()
  x = tc.images(1, 224)
  expected = tc.torch_logits(torch_model, x)
  # BN scales 0.5..1.5 (near 1, as trained) on a deep residual net: float32 drifts ~1e-5 from
  # float64 here, and the bound follows from that (tests/rounding.py), not from a fixed number.
  truth = rounding.torch_float64_logits(torch_model, x)
  tolerance = rounding.tolerance_from(truth, expected)

  official = tmp_path / 'RepMLPNet-B224-train.pth'
  torch.save(torch_model.state_dict(), official)
  model, variables = repmlp_jax.load_torch(official)
  assert model == create_model('RepMLPNet-B224')
  tc.assert_logits_match(expected, tc.flax_logits(model, variables, x), tolerance)
  del variables
  official.unlink()

  mm = tmp_path / 'repmlp-base_3rdparty_8xb64_in1k.pth'
  torch.save({'state_dict': tr.to_mmpretrain_state_dict(torch_model.state_dict()),
              'meta': {'epoch': 300}}, mm)
  mm_model, mm_variables = repmlp_jax.load_torch(mm)
  assert mm_model == model
  tc.assert_logits_match(expected, tc.flax_logits(mm_model, mm_variables, x), tolerance)
  del mm_variables
  mm.unlink()

  deploy_file = tmp_path / 'RepMLPNet-B224-deploy.pth'
  torch.save(torch_model.deploy_state_dict(), deploy_file)
  torch_deploy = tr.create_repmlpnet('RepMLPNet-B224', deploy=True).eval()
  torch_deploy.load_state_dict(torch.load(deploy_file), strict=True)
  deploy_model, deploy_variables = repmlp_jax.load_torch(deploy_file)
  assert deploy_model == create_model('RepMLPNet-B224', deploy=True)
  # The official conversion is exact (tests/test_torch_reference.py, float64), so the training
  # form's float64 logits are the deploy form's truth too.
  deploy_expected = tc.torch_logits(torch_deploy, x)
  tc.assert_logits_match(deploy_expected, tc.flax_logits(deploy_model, deploy_variables, x),
                         rounding.tolerance_from(truth, deploy_expected))
