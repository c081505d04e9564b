"""Golden tests on non-square inputs, both forms, against the PyTorch reference.

With square inputs hp == wp at every stage, so a re-assembly that reads the window grid in the
wrong order (hp and wp swapped) gives the same shapes and, on the tiny variant, passed every
square test; on 32x64 it is 1.6% off. The tiny variant at 32x64 (two windows across and one
down in the last stages, several of each in the first) and RepMLPNet-T224 at 224x448 (the
smallest official variant, batch 1); the stage features against the reference's
forward_features. The v1 RepMLP-ResNet takes exactly its square image_size
(its Global Perceptron is sized for it), so it has no non-square case.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax.models import features
from tests import helpers
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr


@pytest.fixture(scope='module', name='tiny')
def _tiny():
  torch_model = tc.tiny_torch_model(seed=11)
  x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(12))
  return torch_model, x


def test_tiny_training_form_32x64(tiny):
  torch_model, x = tiny
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  # Bound: 8x the reference's own float32 rounding on x (tests/rounding.py).
  tc.assert_logits_match(tc.torch_logits(torch_model, x), tc.flax_logits(model, variables, x),
                         rounding.tolerance(torch_model, x))


def test_tiny_deploy_forms_32x64(tiny):
  torch_model, x = tiny
  # The authors' deploy conversion, imported.
  torch_deploy = torch_model.to_deploy()
  model, variables = repmlp_jax.load_torch(torch_deploy.state_dict())
  assert model.deploy
  tc.assert_logits_match(tc.torch_logits(torch_deploy, x), tc.flax_logits(model, variables, x),
                         rounding.tolerance(torch_deploy, x))
  # Ours, from the training form: the same function as the reference's training form.
  deploy_model, deploy_variables = repmlp_jax.reparam(*repmlp_jax.load_torch(
      torch_model.state_dict()))
  tc.assert_logits_match(tc.torch_logits(torch_model, x),
                         tc.flax_logits(deploy_model, deploy_variables, x),
                         rounding.tolerance(torch_model, x))


def test_tiny_32x64_is_exact_in_float64(tiny):
  torch_model, x = tiny
  expected = rounding.torch_float64_logits(torch_model, x)
  with jax.enable_x64(True):
    model, variables = repmlp_jax.load_torch(torch_model.state_dict())
    model = model.clone(dtype=jnp.float64, precision='highest')
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x.double().numpy().transpose(0, 2, 3, 1))
    got = np.asarray(jax.jit(model.apply)(variables, x64))
  assert got.dtype == np.float64
  assert helpers.relative_error(expected, got) <= 1e-10


def test_t224_at_224x448_both_forms():
  torch.manual_seed(0)
  torch_model = tr.randomize_bn_(tr.create_repmlpnet('RepMLPNet-T224'), seed=1).eval()
  x = torch.randn(1, 3, 224, 448, generator=torch.Generator().manual_seed(3))
  expected = tc.torch_logits(torch_model, x)
  # BN scales 0.5..1.5 (near 1) on a 12-unit residual net: float32 drifts ~1e-6..1e-5 from
  # float64 here; the bound is 8x that drift (tests/rounding.py).
  tolerance = rounding.tolerance(torch_model, x)
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  assert model == repmlp_jax.create_model('RepMLPNet-T224')
  tc.assert_logits_match(expected, tc.flax_logits(model, variables, x), tolerance)
  deploy_model, deploy_variables = repmlp_jax.reparam(model, variables)
  del variables
  tc.assert_logits_match(expected, tc.flax_logits(deploy_model, deploy_variables, x), tolerance)


def test_stage_features_match_the_reference_forward_features_32x64(tiny):
  torch_model, x = tiny
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  with torch.no_grad():
    feats32 = [f.numpy() for f in torch_model.forward_features(x)]
    model64 = copy.deepcopy(torch_model).double()
    feats64 = [f.numpy() for f in model64.forward_features(x.double())]
  ours = jax.jit(lambda v, im: features.extract_features(model, v, im))(
      variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert len(ours) == len(feats32) == 4
  for i, (got, want32, want64) in enumerate(zip(ours, feats32, feats64)):
    got = np.asarray(got).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    assert got.shape == want32.shape, (i, got.shape)
    # Bound: 8x the reference's own float32 rounding of this stage's output (tests/rounding.py).
    bound = rounding.tolerance_from(want64, want32)
    err = helpers.relative_error(want32, got)
    assert err <= bound, f'stage {i}: {err:.3g} > {bound:.3g}'
