"""Training pieces without the input pipeline: schedule, decay mask, FSDP specs, and sharded steps.

The 8-device runs (conftest's simulated CPU devices), the FSDP option and two jax.distributed
processes must give the loss and parameters of a 1-device run on the same global batches, within
float32 reduction-order noise: relative 1e-5 on the loss, 1e-5 of max(largest entry, 1e-2) of
each array on every parameter (and BN statistic, in-process).
"""

import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from configs import digits
from configs import finetune_b224
from configs import imagenet_b224
from configs import imagenet_b256
from configs import imagenet_d256
from configs import imagenet_l256
from configs import imagenet_t224
from configs import imagenet_t256
from repmlp_jax import model_io
from repmlp_jax.train import optim
from repmlp_jax.train import sharding
from repmlp_jax.train import experiment
from repmlp_jax.train import trainer
from tests import devices

NUM_CLASSES = 10
GLOBAL_BATCH = 16
NUM_STEPS = 3
TOLERANCE = 1e-5


def tiny_config(**overrides):
  """Two stages of the tiny test variant: every kind of layer, half the compile time."""
  config = common.get_config()
  config.model = '_RepMLPNet-Tiny'
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))
  config.image_size = config.eval_image_size = 32
  config.global_batch_size = GLOBAL_BATCH
  config.base_lr = 4e-3
  config.warmup_epochs = 1.0
  # Some gradients are zero up to round-off (a BN bias right before a conv + train-mode BN,
  # whose mean subtraction cancels it); Adam with eps 1e-8 turns that noise into full-size
  # steps of either sign, so devices would "disagree" on them. eps 1e-3 keeps Adam's behaviour
  # on real gradients (1e-3 .. 1e-1 here) and makes noise-driven steps negligible.
  config.adam_eps = 1e-3
  config.dtype = 'float32'  # Compared at 1e-5 across devices; common.py's default is bfloat16.
  config.update(overrides)
  return config


def tiny_steps() -> experiment.Steps:
  return experiment.Steps(per_epoch=2, total=10, warmup=2, eval_every=10, checkpoint_every=10,
                         log_every=1)


def global_batches(num_steps: int = NUM_STEPS, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, size=GLOBAL_BATCH).astype(np.int32)}
          for _ in range(num_steps)]


def run_steps(config, devices, batches):
  """Trains on `batches` with a mesh over `devices`; returns (losses, final state on host)."""
  exp = experiment.Experiment(config, num_classes=NUM_CLASSES, steps=tiny_steps(),
                             mesh=sharding.create_mesh(devices))
  state = exp.init_state()
  losses, params = [], [jax.device_get(state['params'])]
  for batch in batches:
    state, measurements = exp.train_step(state, sharding.global_batch(batch, exp.batch_sharding))
    losses.append(measurements['loss'])
    params.append(jax.device_get(state['params']))
  state = jax.device_get(state)
  state['history'] = params  # Parameters before the first and after every step.
  return np.asarray(jax.device_get(losses)), state, exp


def assert_states_close(a, b):
  for name in ('params', 'batch_stats'):
    paths_a = jax.tree_util.tree_leaves_with_path(a[name])
    for (path, x), y in zip(paths_a, jax.tree.leaves(b[name])):
      x, y = np.asarray(x), np.asarray(y)
      # Relative to the array's largest entry, but at least to 1 / 100 of a unit: arrays with
      # (numerically) zero gradients stay near 0 and their relative error means nothing.
      err = np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-2)
      assert err < TOLERANCE, f'{name}{jax.tree_util.keystr(path)}: error {err}'


@pytest.mark.parametrize('module', [imagenet_t224, imagenet_b224, imagenet_t256, imagenet_b256,
                                    imagenet_d256, imagenet_l256, finetune_b224, digits])
def test_configs_build_their_model(module):
  config = module.get_config()
  model = experiment.build_model(config, 1000)  # Resolves the name; checks the image sizes.
  assert config.image_size % model.input_multiple == 0
  if module.__name__.startswith('configs.imagenet'):
    recipe = (config.global_batch_size, config.num_epochs, config.warmup_epochs, config.base_lr,
              config.warmup_lr, config.min_lr, config.weight_decay, config.grad_clip_norm,
              config.label_smoothing, config.mixup_alpha, config.cutmix_alpha,
              config.mixup_switch_prob, config.ema_decay, config.dataset)
    assert recipe == (256, 100, 10, 1e-3, 5e-7, 0.0, 0.1, 5.0, 0.1, 0.4, 1.0, 0.5, 0.0,
                      'imagenet2012')
    assert model.image_size == config.image_size == config.eval_image_size


def test_schedule_warmup_then_cosine():
  config = tiny_config(global_batch_size=512, base_lr=1e-3, warmup_lr=5e-7, min_lr=1e-5)
  schedule = optim.learning_rate_schedule(config, total_steps=100, warmup_steps=10)
  # Scaled by 512 / 256 = 2: warmup from 1e-6 to the peak 2e-3, cosine over the whole run.
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(schedule(5), 1e-6 + (2e-3 - 1e-6) / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 2e-5 + 0.5 * (2e-3 - 2e-5) * (1 + np.cos(0.1 * np.pi)),
                             rtol=1e-6)
  np.testing.assert_allclose(schedule(100), 2e-5, rtol=1e-6)


def test_weight_decay_only_on_kernels():
  config = tiny_config()
  exp = experiment.Experiment(config, num_classes=NUM_CLASSES, steps=tiny_steps())
  mask = optim.decay_mask(exp.abstract_state['params'])
  unit = mask['stages_0_0']
  assert unit['repmlp_block']['fc3'] and unit['ffn_block']['ffn_fc1']['conv']['kernel']
  assert mask['head']['kernel'] and not mask['head']['bias']
  assert not unit['prebn1']['scale'] and not unit['prebn1']['bias']
  assert not unit['repmlp_block']['gp']['fc1']['bias']


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert sharding.fsdp_spec((4, 64, 64), 8, 1) == P(None, 'data', None)
  assert sharding.fsdp_spec((12, 10), 8, 1) == P()  # Nothing divisible by 8.
  assert sharding.fsdp_spec((16, 40), 8, 1) == P(None, 'data')
  assert sharding.fsdp_spec((8, 8), 8, 100) == P()  # Too small to split.
  assert sharding.fsdp_spec((64, 64), 1, 1) == P()  # A single device.


def test_derive_steps_converts_epochs_in_one_place():
  config = tiny_config(num_epochs=3.0, warmup_epochs=0.5, eval_every_epochs=1.0)
  s = experiment.derive_steps(config, num_train_examples=100)  # 6 steps of 16 per epoch.
  assert (s.per_epoch, s.total, s.warmup, s.eval_every) == (6, 18, 3, 6)
  config.num_train_steps = 5
  assert experiment.derive_steps(config, 100).total == 5
  with pytest.raises(ValueError, match='exceeds the 10 training examples'):
    experiment.derive_steps(config, 10)


def test_unknown_variant_and_bad_image_size_fail_clearly():
  with pytest.raises(ValueError, match="Unknown model 'RepMLPNet-X999'.*Available"):
    experiment.build_model(tiny_config(model='RepMLPNet-X999'), NUM_CLASSES)
  with pytest.raises(ValueError, match='image_size=40 .* multiple of 16'):
    experiment.build_model(tiny_config(image_size=40), NUM_CLASSES)


@pytest.fixture(scope='module')
def one_device():
  """Losses, final state and Experiment of NUM_STEPS steps on a 1-device mesh: the reference."""
  return run_steps(tiny_config(), jax.devices()[:1], global_batches())


@devices.needs_8_cpu_devices
def test_eight_devices_match_one_device(one_device):
  assert jax.device_count() == 8
  # Official recipe: mixup / CutMix over the global (sharded) batch, BN over the global batch.
  losses_8, state_8, exp = run_steps(tiny_config(fsdp=False), jax.devices(), global_batches())
  assert exp.mesh.size == 8 and exp.batch_sharding.spec == P('data')
  np.testing.assert_allclose(losses_8, one_device[0], rtol=TOLERANCE)
  assert not np.allclose(losses_8[0], losses_8[-1])  # It did train.
  assert int(state_8['step']) == NUM_STEPS
  assert_states_close(state_8, one_device[1])


@devices.needs_8_cpu_devices
def test_fsdp_shards_large_arrays_and_matches_one_device(one_device):
  # With an EMA of the weights, which must not change the training itself.
  config = tiny_config(fsdp=True, fsdp_min_size=256, ema_decay=0.5)
  losses_8, state_8, exp = run_steps(config, jax.devices(), global_batches())
  fc3 = exp.state_sharding['params']['stages_0_0']['repmlp_block']['fc3']
  assert 'data' in fc3.spec  # (2, 16, 16): the 16-wide axes divide by 8.
  mu = exp.state_sharding['opt_state'][1][0].mu['stages_0_0']['repmlp_block']['fc3']
  assert mu.spec == fc3.spec  # Adam moments shard like their parameters.
  assert exp.state_sharding['params']['head']['bias'].spec == P()  # Small: replicated.
  np.testing.assert_allclose(losses_8, one_device[0], rtol=TOLERANCE)
  assert_states_close(state_8, one_device[1])
  assert exp.state_sharding['ema']['params']['stages_0_0']['repmlp_block']['fc3'].spec == fc3.spec
  expected = state_8['history'][0]
  for params in state_8['history'][1:]:
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, expected, params)
  chex.assert_trees_all_close(state_8['ema']['params'], expected, rtol=1e-5, atol=1e-7)
  # Evaluation gathers the sharded weights once and counts what one device counts.
  state_8.pop('history')
  batch = {**global_batches(1, seed=1)[0], 'mask': np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - 3}
  metrics_8 = exp.evaluate(jax.device_put(state_8, exp.state_sharding),
                           [sharding.global_batch(batch, exp.batch_sharding)])
  assert metrics_8['count'] == GLOBAL_BATCH - 3 and 'ema_top1' in metrics_8
  one_exp = experiment.Experiment(config, num_classes=NUM_CLASSES, steps=tiny_steps(),
                                  mesh=sharding.create_mesh(jax.devices()[:1]))
  metrics_1 = one_exp.evaluate(jax.device_put(state_8, one_exp.state_sharding),
                               [sharding.global_batch(batch, one_exp.batch_sharding)])
  for key, value in metrics_1.items():
    np.testing.assert_allclose(metrics_8[key], value, rtol=1e-5, err_msg=key)


def test_load_pretrained_keeps_all_but_a_resized_head(one_device, tmp_path):
  _, trained, exp = one_device
  variables = {'params': dict(trained['params']), 'batch_stats': trained['batch_stats']}
  rng = np.random.default_rng(0)  # An imported model with 7 classes instead of 10.
  variables['params']['head'] = {'kernel': rng.normal(size=(16, 7)).astype(np.float32),
                                 'bias': np.zeros(7, np.float32)}
  model_io.save_model(tmp_path / 'imported', exp.model.clone(num_classes=7), variables)
  fresh = jax.device_get(exp.init_state())
  loaded = jax.device_get(trainer.load_pretrained(exp, exp.init_state(),
                                                  str(tmp_path / 'imported')))
  for collection in ('params', 'batch_stats'):
    chex.assert_trees_all_equal(loaded[collection]['stages_1_0'],
                                trained[collection]['stages_1_0'])
  np.testing.assert_array_equal(loaded['params']['head']['kernel'],
                                fresh['params']['head']['kernel'])
  assert int(loaded['step']) == 0
  deploy_variables = exp.reparam({'params': trained['params'],
                                  'batch_stats': trained['batch_stats']})
  model_io.save_model(tmp_path / 'deploy', exp.deploy_model, deploy_variables)
  with pytest.raises(ValueError, match='deploy-form model'):
    trainer.load_pretrained(exp, exp.init_state(), str(tmp_path / 'deploy'))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@devices.needs_8_cpu_devices  # CPU workers compared with a CPU reference.
def test_two_processes_match_one_process(one_device, tmp_path):
  """Two jax.distributed CPU processes (2 devices each), each feeding its half of every batch."""
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root}
  workers = [subprocess.Popen(
      [sys.executable, '-m', 'tests.train_worker', str(port), str(i), str(tmp_path / f'{i}.npz')],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [w.communicate(timeout=300)[0] for w in workers]
  for w, out in zip(workers, outputs):
    assert w.returncode == 0, out[-3000:]
  reference_losses, reference_state, _ = one_device
  for i in range(2):
    result = np.load(tmp_path / f'{i}.npz')
    assert int(result['device_count']) == 4 and int(result['process_count']) == 2
    np.testing.assert_allclose(result['losses'], reference_losses, rtol=TOLERANCE)
    leaves = jax.tree.leaves(reference_state['params'])
    assert len(leaves) == int(result['num_leaves'])
    for j, leaf in enumerate(leaves):
      x = np.asarray(leaf)
      err = np.max(np.abs(x - result[f'param_{j}'])) / max(np.max(np.abs(x)), 1e-2)
      assert err < TOLERANCE, f'parameter {j}: relative error {err}'
