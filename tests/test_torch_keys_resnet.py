"""v1 PyTorch state_dicts <-> Flax variables, against the reference in tests/torch_reference.py.

Golden tests: imported Flax logits == PyTorch logits (training and official deploy forms) for
tiny variants and for both RepMLP-ResNet-50 kinds at 224x224; at full size the same run also
checks this project's reparam (train form == deploy form) and that it equals the official deploy
conversion. Round trips are exact; detect() names the variant from shapes alone.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import repmlp_jax
from repmlp_jax import model_io
from repmlp_jax.pytorch import mapping
from repmlp_jax.pytorch import keys_resnet as tk
from tests import helpers
from tests import rounding
from tests import torch_reference as tr

TINY = dict(num_blocks=(1, 2, 2, 1), num_classes=10, img_size=64, h=2, w=2, c3_groups=2,
            c4_groups=4, channels=(32, 64, 128, 256), stem_channels=16)


def _numpy(sd):
  return {k: v.detach().numpy() for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _logits(model, variables, x):
  return np.asarray(_apply(model)(variables, _nhwc(x)))


def _assert_round_trips(sd, variables, model):
  back = tk.variables_to_torch(variables, model)
  assert list(back) == list(sd)  # official names and order
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  again = tk.variables_from_torch(back, model)
  chex.assert_trees_all_equal(again, variables)


@pytest.mark.parametrize('kind', ['light', 'bottleneck', 'plain'])
def test_tiny_import_matches_pytorch_in_both_forms(kind):
  torch.manual_seed(0)
  reference = tr.randomize_bn_(tr.RepMLPResNet(kind, **TINY), seed=1).eval()
  x = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    expected = reference(x).numpy()
  # Bound: 8x the reference's own float32 rounding on x (tests/rounding.py). Measured: rounding
  # 1.2e-7 .. 2.6e-7, so bounds of 9.5e-7 .. 2.1e-6; our logits 1.7e-7 .. 4.3e-7 off (both forms).
  tolerance = rounding.tolerance(reference, x)
  for sd in (_numpy(reference.state_dict()), _numpy(tr.deploy_state_dict(reference))):
    name, overrides, deploy = tk.detect(sd)
    assert deploy == ('stage0.0.conv.bias' in sd)
    model = repmlp_jax.create_model(name, deploy=deploy, **overrides)
    assert (model.kind, model.depths, model.channels) == (kind, (1, 2, 2, 1), (32, 64, 128, 256))
    if kind != 'plain':
      assert (model.image_size, model.h, model.c3_groups, model.c4_groups) == (64, 2, 2, 4)
    variables = tk.variables_from_torch(sd, model)
    err = helpers.relative_error(expected, _logits(model, variables, x))
    assert err <= tolerance, (err, tolerance)
    _assert_round_trips(sd, variables, model)


@pytest.mark.parametrize('kind', ['light', 'bottleneck', 'plain'])
def test_both_forms_round_trip_exactly_without_a_forward(kind):
  # The conversions alone (no compile): every key, its order, shape and value come back.
  torch.manual_seed(0)
  reference = tr.randomize_bn_(tr.RepMLPResNet(kind, **TINY), seed=1)
  for sd in (_numpy(reference.state_dict()), _numpy(tr.deploy_state_dict(reference))):
    name, overrides, deploy = tk.detect(sd)
    model = repmlp_jax.create_model(name, deploy=deploy, **overrides)
    variables = tk.variables_from_torch(sd, model)
    assert ('batch_stats' in variables) != deploy
    _assert_round_trips(sd, variables, model)


@pytest.mark.parametrize('kind, name', [('light', 'RepMLP-ResNet50-Light'),
                                        ('bottleneck', 'RepMLP-ResNet50-Bottleneck')])
def test_resnet50_import_and_reparam_match_pytorch(kind, name):
  torch.manual_seed(0)
  reference = tr.randomize_bn_(tr.create_repmlp_resnet50(kind), seed=2).eval()
  x = torch.randn(1, 3, 224, 224)
  with torch.no_grad():
    expected = reference(x).numpy()
  sd = _numpy(reference.state_dict())
  assert tk.detect(sd) == (name, {}, False)
  model = repmlp_jax.create_model(name)
  variables = tk.variables_from_torch(sd, model)
  y = _logits(model, variables, x)
  # Exactness first: our model in float64 against the reference in float64 (<= 1e-10), so any
  # systematic error fails here whatever the precision. What is left between the float32 runs is
  # rounding: |t32 - y32| <= |t32 - t64| + |t64 - y64| + |y64 - y32|, the two roundings added.
  # At this size ours is the larger (XLA:CPU's long float32 sums): bottleneck 2.3e-6, light
  # 1.1e-6, against PyTorch's 2.1e-7 for both. The bound is twice their sum (the deploy forms'
  # roundings are not measured, the factor covers them): 5.1e-6 and 2.5e-6; measured: ours 2.4e-6
  # and 1.1e-6 off PyTorch's (both forms), the train and deploy forms 3.1e-7 and 3.4e-7 apart.
  torch64 = rounding.torch_float64_logits(reference, x)
  ours64 = rounding.flax_float64(model, variables, _nhwc(x))
  assert helpers.relative_error(torch64, ours64) <= 1e-10
  tolerance = 2 * (helpers.relative_error(torch64, expected) + helpers.relative_error(ours64, y))
  assert helpers.relative_error(expected, y) <= tolerance
  # This project's reparam: train form == deploy form, at full size.
  deploy_model = model.clone(deploy=True)
  ours = jax.jit(functools.partial(repmlp_jax.reparam_variables, model))(variables)
  assert helpers.relative_error(y, _logits(deploy_model, ours, x)) <= tolerance
  # The official deploy file imports into the deploy form and gives the same logits.
  deploy_sd = _numpy(tr.deploy_state_dict(reference))
  assert tk.detect(deploy_sd) == (name, {}, True)
  official = tk.variables_from_torch(deploy_sd, deploy_model)
  assert helpers.relative_error(expected, _logits(deploy_model, official, x)) <= tolerance
  # Each fused fc3 entry is fc3 * BN scale plus a few (<= 4) float32 branch terms, rounded a few
  # ulps by each conversion: 8 ulps of the largest entry (9.5e-7). Measured: 1.5e-7.
  fc3 = lambda v: v['params']['stage3_1'][f'{"light" if kind == "light" else "btnk"}_repmlp']['fc3']
  assert helpers.relative_error(fc3(official), fc3(ours)) <= rounding.FACTOR * rounding.FLOAT32_EPS
  assert list(tk.variables_to_torch(official, deploy_model)) == list(deploy_sd)


@pytest.mark.parametrize('groups, name', [((4, 8), 'RepMLP-ResNet50-g4-8'),
                                          ((8, 16), 'RepMLP-ResNet50-g8-16')])
@pytest.mark.parametrize('deploy', [False, True])
def test_detect_names_the_group_settings(groups, name, deploy):
  with torch.device('meta'):  # detect reads shapes only
    reference = tr.RepMLPResNet('bottleneck', img_size=320, h=10, w=10,
                                reparam_conv_k=(1, 3, 5, 7), c3_groups=groups[0],
                                c4_groups=groups[1], deploy=deploy)
  assert tk.detect(reference.state_dict()) == (name, {}, deploy)


def test_detect_reports_what_differs_from_the_closest_variant():
  with torch.device('meta'):
    reference = tr.create_repmlp_resnet50('bottleneck', num_classes=10, c3_groups=4, c4_groups=16)
  name, overrides, deploy = tk.detect(reference.state_dict())
  assert (name, deploy) == ('RepMLP-ResNet50-Bottleneck', False)
  assert overrides == {'num_classes': 10, 'c3_groups': 4, 'c4_groups': 16}
  with torch.device('meta'):
    plain = tr.create_repmlp_resnet50('plain')
  assert tk.detect(plain.state_dict()) == ('ResNet-50', {}, False)


def test_detect_refuses_other_checkpoints():
  with torch.device('meta'):
    repmlpnet = tr.create_repmlpnet('RepMLPNet-T224')
  with pytest.raises(ValueError, match=r'Not a RepMLP-ResNet / ResNet-50 \(v1 keys\) state_dict'):
    tk.detect(repmlpnet.state_dict())


def test_detect_reads_a_small_model_and_its_global_perceptron_reduction():
  # Stages of 1 and 2 blocks (the fewest a RepMLP stage can have) and a reduction of 4.
  with torch.device('meta'):
    reference = tr.RepMLPResNet('light', **{**TINY, 'fc1_fc2_reduction': 4})
  name, overrides, deploy = tk.detect(reference.state_dict())
  assert (name, deploy) == ('RepMLP-ResNet50-Light', False)
  assert overrides['depths'] == (1, 2, 2, 1) and overrides['fc1_fc2_reduction'] == 4
  model = repmlp_jax.create_model(name, deploy=deploy, **overrides)
  tk.variables_from_torch(_numpy_meta(reference.state_dict()), model)  # Fits every key.


def _numpy_meta(sd):
  return {k: np.zeros(v.shape, np.float32) for k, v in sd.items()}


def _without(sd, prefix):
  return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _renumbered(sd, old, new):
  return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def test_detect_refuses_inconsistent_state_dicts():
  with torch.device('meta'):
    sd = dict(tr.RepMLPResNet('light', **TINY).state_dict())
  first = list(sd)[:4]
  fc1 = 'stage3.1.light_repmlp.fc1_fc2.fc1.weight'  # (hidden, C * hp * wp)
  wider = {**sd, fc1: torch.empty((sd[fc1].shape[0], 4 * sd[fc1].shape[1]), device='meta')}
  family = r'RepMLP-ResNet / ResNet-50 \(v1 keys\)'
  cases = [
      (_without(sd, 'linear.'), re.escape(f'no stage0.0.conv.weight / linear.weight (first '
                                          f'keys: {first}).')),
      (_renumbered(sd, 'stage1.0.', 'stage1.5.'), r'blocks of stage1 are not numbered 0..n-1 '
                                                   r'\(\[5\]\)'),
      (_without(sd, 'stage2.1.'), 'a light model needs RepMLP blocks in stage2 and stage3'),
      (_without(sd, 'stage3.1.'), 'a light model needs RepMLP blocks in stage2 and stage3'),
      # Stage 3's partition grid twice as wide: it implies a 128-pixel input, stage 2 a 64.
      (wider, r'disagree on the partition \(2 vs 2\) or the input size \(64 vs 128\)'),
      (_without(sd, 'stage2.0.conv3.'), "has no 'stage2.0.conv3.conv.weight', which its other"),
  ]
  for state_dict, message in cases:
    with pytest.raises(mapping.DetectionError, match=f'^(Not a )?{family}.*{message}'):
      tk.detect(state_dict)


def test_every_key_problem_is_reported_at_once():
  reference = tr.RepMLPResNet('light', **TINY)
  sd = _numpy(reference.state_dict())
  del sd['stage2.1.light_repmlp.fc3.weight']
  sd['stage4.0.extra.weight'] = np.zeros(3, np.float32)
  sd['linear.weight'] = np.zeros((7, 256), np.float32)
  model = repmlp_jax.create_model('_RepMLP-ResNet-Tiny', num_classes=10)
  with pytest.raises(mapping.KeyMismatchError) as info:
    tk.variables_from_torch(sd, model)
  error = info.value
  assert error.missing == ['stage2.1.light_repmlp.fc3.weight']
  assert error.unexpected == ['stage4.0.extra.weight']
  assert error.misshaped == [('linear.weight', (10, 256), (7, 256))]
  deploy_sd = _numpy(tr.deploy_state_dict(reference))
  with pytest.raises(mapping.KeyMismatchError, match='training or the deploy form'):
    tk.variables_from_torch(deploy_sd, model)


def test_variables_of_another_model_are_refused():
  model = repmlp_jax.create_model('_RepMLP-ResNet-Tiny', num_classes=10)
  with pytest.raises(ValueError, match='missing params/stage0_0/conv/kernel'):
    tk.variables_to_torch({'params': {}, 'batch_stats': {}}, model)
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), model_io.abstract_variables(model))
  variables['params']['linear']['kernel'] = np.zeros((256, 3), np.float32)
  with pytest.raises(ValueError, match=r'belong to .*: params/linear/kernel has shape '
                     r'\(256, 3\), expected \(256, 10\)$'):
    tk.variables_to_torch(variables, model)


def test_every_problem_of_the_variables_is_reported_at_once():
  # A missing leaf, then a mis-shaped one; a mis-shaped leaf, then a missing one: all four named.
  model = repmlp_jax.create_model('_RepMLP-ResNet-Tiny', num_classes=10)
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), model_io.abstract_variables(model))
  del variables['params']['stage0_0']['conv']['kernel']
  variables['params']['linear']['kernel'] = np.zeros((256, 3), np.float32)
  variables['params']['stage1_0']['conv1']['conv']['kernel'] = np.zeros((1, 1, 1, 1), np.float32)
  del variables['batch_stats']['stage4_0']
  with pytest.raises(ValueError) as info:
    tk.variables_to_torch(variables, model)
  message = str(info.value)
  assert message.startswith('The variables do not belong to RepMLPResNet')
  for problem in ('missing params/stage0_0/conv/kernel',
                  'params/stage1_0/conv1/conv/kernel has shape (1, 1, 1, 1)',
                  'missing batch_stats/stage4_0/',
                  'params/linear/kernel has shape (256, 3), expected (256, 10)'):
    assert problem in message, problem
