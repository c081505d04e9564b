"""Export to PyTorch: exact round trip; official deploy model loads our deploy form; no torch."""

import importlib
import sys

import jax
import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax import model_io
from tests import helpers
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr


def test_round_trip_torch_flax_torch_is_exact(tmp_path):
  torch_model = tc.tiny_torch_model()
  sd = torch_model.state_dict()
  torch.save(sd, tmp_path / 'in.pth')
  model, variables = repmlp_jax.load_torch(tmp_path / 'in.pth')
  out = repmlp_jax.save_torch(tmp_path / 'out.pth', model, variables)
  back = torch.load(out, weights_only=True)
  assert list(back) == list(sd)  # Official names and order.
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  # The authors' model loads it strictly.
  reloaded = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES).eval()
  reloaded.load_state_dict(back, strict=True)


def test_round_trip_of_a_deploy_file_gives_the_same_logits():
  torch_deploy = tc.tiny_torch_model(deploy=True)
  model, variables = repmlp_jax.load_torch(torch_deploy.state_dict())
  back = repmlp_jax.to_torch_state_dict(model, variables)
  assert list(back) == list(torch_deploy.state_dict())
  reloaded = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES, deploy=True)
  reloaded.load_state_dict(back, strict=True)
  x = tc.images()
  tc.assert_logits_match(tc.torch_logits(torch_deploy, x), tc.torch_logits(reloaded.eval(), x),
                         rounding.tolerance(torch_deploy, x))


def test_our_deploy_form_loads_into_the_official_deploy_model():
  # Deploy variables made here (reparam of a training form) -> official deploy model, strict.
  torch_model = tc.tiny_torch_model(seed=5)
  model, variables = repmlp_jax.reparam(
      *repmlp_jax.load_torch(torch_model.state_dict()))
  sd = repmlp_jax.to_torch_state_dict(model, variables)
  official = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES, deploy=True)
  official.load_state_dict(sd, strict=True)
  assert list(sd) == list(official.state_dict())
  x = tc.images()
  tc.assert_logits_match(tc.torch_logits(torch_model, x), tc.torch_logits(official.eval(), x),
                         rounding.tolerance(torch_model, x))


def test_variables_trained_here_export_to_the_authors_layout():
  # Fresh Flax variables (not from torch) with BatchNorms far from identity.
  model = repmlp_jax.create_model(tc.TINY_NAME, num_classes=tc.TINY_CLASSES)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(a.dtype),
                           model_io.abstract_variables(model))
  variables = helpers.randomize_batch_norm(variables, seed=3)
  official = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES)
  official.load_state_dict(repmlp_jax.to_torch_state_dict(model, variables), strict=True)
  x = tc.images()
  tc.assert_logits_match(tc.flax_logits(model, variables, x),
                         tc.torch_logits(official.eval(), x), rounding.tolerance(official, x))


def test_mmpretrain_layout_export(tmp_path):
  torch_model = tc.tiny_torch_model()
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  path = repmlp_jax.save_torch(tmp_path / 'mm.pth', model, variables, layout='mmpretrain')
  saved = torch.load(path, weights_only=True)
  expected = tr.to_mmpretrain_state_dict(torch_model.state_dict())
  assert list(saved['state_dict']) == list(expected)
  for k, v in expected.items():
    assert torch.equal(saved['state_dict'][k], v), k


def test_save_torch_never_overwrites(tmp_path):
  model, variables = repmlp_jax.load_torch(tc.tiny_torch_model().state_dict())
  path = tmp_path / 'exists.pth'
  path.write_bytes(b'keep me')
  with pytest.raises(FileExistsError):
    repmlp_jax.save_torch(path, model, variables)
  assert path.read_bytes() == b'keep me'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['exists.pth']  # No temporary left.


def test_without_torch_the_error_says_what_to_install(monkeypatch, tmp_path):
  sd = {k: v.numpy() for k, v in tc.tiny_torch_model().state_dict().items()}
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
  # The package imports without torch (fresh import of every repmlp_jax module).
  for name in [n for n in sys.modules if n == 'repmlp_jax' or n.startswith('repmlp_jax.')]:
    monkeypatch.delitem(sys.modules, name)
  fresh = importlib.import_module('repmlp_jax')
  # The CPU wheel first, then the extra from the checkout (the package is not on PyPI).
  torch_hint = r"download\.pytorch\.org/whl/cpu, then pip install -e '\.\[torch\]'"
  model, variables = fresh.load_torch(sd)  # numpy arrays need no torch.
  assert model.num_classes == tc.TINY_CLASSES
  with pytest.raises(ImportError, match=torch_hint):
    fresh.load_torch(tmp_path / 'any.pth')
  with pytest.raises(ImportError, match=torch_hint):
    fresh.to_torch_state_dict(model, variables)
  with pytest.raises(ImportError, match=torch_hint):
    fresh.save_torch(tmp_path / 'out.pth', model, variables)
  assert not (tmp_path / 'out.pth').exists()
