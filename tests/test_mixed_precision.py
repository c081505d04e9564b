"""bfloat16 compute with float32 state, the precision setting, and gradient accumulation.

bfloat16 keeps 8 bits of mantissa: a bfloat16 training step's loss is compared with the float32
step's to 2e-2 relative (measured: about 1e-4 on these steps), everything the step keeps
(parameters, optimizer state, BatchNorm statistics) must be float32 bit for bit in dtype.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import repmlp_jax
from configs import common
from configs import digits
from repmlp_jax import model_io
from repmlp_jax.models import factory
from repmlp_jax.train import experiment
from repmlp_jax.train import sharding
from repmlp_jax.train import trainer
from tests import fast_init
from tests import helpers

NUM_CLASSES = 10
GLOBAL_BATCH = 16
TINY = '_RepMLPNet-Tiny'
BF16_LOSS_RTOL = 2e-2


def tiny_config(**overrides):
  """Two stages of the tiny variant (as tests/test_train_steps.py), float32 unless overridden."""
  config = common.get_config()
  config.model = TINY
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))
  config.image_size = config.eval_image_size = 32
  config.global_batch_size = GLOBAL_BATCH
  config.warmup_epochs = 1.0
  config.dtype = 'float32'
  # Some gradients are zero up to round-off (tests/test_train_steps.py says why); Adam's eps
  # 1e-3 keeps them from becoming full-size steps, so two programs' updates can be compared.
  config.adam_eps = 1e-3
  config.update(overrides)
  return config


def tiny_steps() -> experiment.Steps:
  return experiment.Steps(per_epoch=2, total=10, warmup=2, eval_every=10, checkpoint_every=10,
                         log_every=1)


def one_device_experiment(config) -> experiment.Experiment:
  return experiment.Experiment(config, num_classes=NUM_CLASSES, steps=tiny_steps(),
                              mesh=sharding.create_mesh(jax.devices()[:1]))


def batches(num_steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, size=GLOBAL_BATCH).astype(np.int32)}
          for _ in range(num_steps)]


def train(exp, data, state=None):
  state, losses = exp.init_state() if state is None else state, []
  for batch in data:
    state, measurements = exp.train_step(state, sharding.global_batch(batch, exp.batch_sharding))
    losses.append(measurements['loss'])
  return jax.device_get(state), np.asarray(jax.device_get(losses)), measurements


@pytest.fixture(scope='module')
def float32_experiment():
  """The float32 Experiment of tiny_config(): its compiled init and step serve several tests."""
  return one_device_experiment(tiny_config())


@pytest.fixture(scope='module')
def bfloat16_tiny():
  """The bfloat16 tiny model and numpy-drawn variables in the dtypes its init gives (float32).

  fast_init instead of model.init: the eager init dispatches (and compiles) every initializer op
  one by one, which took most of these tests' time.
  """
  model = repmlp_jax.create_model(TINY, num_classes=NUM_CLASSES, dtype='bfloat16')
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  return model, fast_init.random_variables(model, (1, 32, 32, 3))


def test_bfloat16_step_keeps_float32_state_and_follows_float32_loss(float32_experiment):
  data = batches(3)
  state32, losses32, _ = train(float32_experiment, data)
  exp16 = one_device_experiment(tiny_config(dtype='bfloat16'))
  assert exp16.model.dtype == jnp.bfloat16
  # What its init returns (traced, not run) is float32 throughout. Both runs start from one
  # state, the float32 Experiment's (compiled once for several tests).
  for path, leaf in jax.tree_util.tree_leaves_with_path(exp16.abstract_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, f'{jax.tree_util.keystr(path)}: {leaf.dtype}'
  state16, losses16, measurements = train(exp16, data, float32_experiment.init_state())
  for name in ('params', 'batch_stats', 'opt_state'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(state16[name]):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, f'{name}{jax.tree_util.keystr(path)}: {leaf.dtype}'
  assert all(v.dtype == jnp.float32 for k, v in measurements.items() if k != 'accuracy')
  np.testing.assert_allclose(losses16, losses32, rtol=BF16_LOSS_RTOL)
  assert not np.array_equal(losses16, losses32)  # The bfloat16 step did compute in bfloat16.


def test_bfloat16_activations_and_float32_batch_norm_reductions(bfloat16_tiny):
  model, variables = bfloat16_tiny
  # The stem BN's running mean from 0, as after init: the new one is 0.1 * the batch mean alone.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if jax.tree_util.keystr(path) == (
          "['batch_stats']['conv_embedding']['bn']['mean']") else v, variables)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)

  @jax.jit  # One program for both forwards: one compile.
  def forwards(variables, x):
    features = model.apply(variables, x, return_features=True)
    _, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=True)
    return features, state

  features, state = forwards(variables, x)
  assert all(v.dtype == jnp.bfloat16 for v in features.values())
  # The stem's BatchNorm sees the bfloat16 conv output; its running mean after one train-mode
  # call (momentum 0.9, from 0) is 0.1 * the batch mean, which must be the float32 mean of that
  # bfloat16 input, not a bfloat16 reduction (whose error here is ~1e-3 relative).
  conv_out = state['intermediates']['conv_embedding']['conv']['__call__'][0]
  assert conv_out.dtype == jnp.bfloat16
  mean = state['batch_stats']['conv_embedding']['bn']['mean']
  assert mean.dtype == jnp.float32
  # XLA may also let the BatchNorm read the convolution's float32 result before its rounding to
  # bfloat16 (xla_allow_excess_precision, on by default; XLA:CPU computes bfloat16 convolutions
  # in float32): the float32 mean of that map is as good. A bfloat16 reduction matches neither.
  stem = variables['params']['conv_embedding']['conv']['kernel']
  unrounded = jax.lax.conv_general_dilated(
      x.astype(jnp.bfloat16).astype(jnp.float32), stem.astype(jnp.bfloat16).astype(jnp.float32),
      (4, 4), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  candidates = [0.1 * jnp.mean(m.astype(jnp.float32), axis=(0, 1, 2))
                for m in (conv_out, unrounded)]
  assert any(np.allclose(mean, c, rtol=1e-5, atol=1e-7) for c in candidates), (mean, candidates)


def test_bfloat16_checkpoint_and_reparam_keep_float32_weights(bfloat16_tiny, tmp_path):
  model, variables = bfloat16_tiny
  deploy_model, deploy_variables = repmlp_jax.reparam(model, variables)
  assert deploy_model.dtype == jnp.bfloat16
  model_io.save_model(tmp_path / 'deploy', deploy_model, deploy_variables)
  loaded_model, loaded = model_io.load_model(tmp_path / 'deploy')
  assert loaded_model.dtype == jnp.bfloat16 and loaded_model.deploy
  assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_evaluation_runs_the_deploy_form_on_bfloat16_parameters():
  """train.py's deploy evaluation casts the reparam'd parameters once (factory.cast_params, the
  Predictor's rule): bfloat16 weights, float32 BatchNorms, and the same logits, bit for bit, as
  the model casting the float32 weights itself."""
  exp = one_device_experiment(tiny_config(dtype='bfloat16'))
  assert exp.eval_image_dtype == 'bfloat16'
  variables = fast_init.random_variables(exp.model, (1, 32, 32, 3))
  cast = exp.deploy_variables(variables)
  assert helpers.float32_params(cast) == helpers.batch_norm_params(cast)
  assert {p.dtype for p in jax.tree.leaves(cast['params'])} == {
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)).astype(jnp.bfloat16)
  got = exp.deploy_model.apply(cast, images)
  expected = exp.deploy_model.apply(exp.reparam(variables), images)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
  unchanged = factory.cast_params(variables, jnp.float32)
  assert all(a is b for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(variables)))
  assert one_device_experiment(tiny_config()).eval_image_dtype == 'float32'


def _dots_and_convs(lowered_text: str) -> list[str]:
  return [line for line in lowered_text.splitlines()
          if 'stablehlo.dot_general' in line or 'stablehlo.convolution' in line]


@pytest.mark.parametrize('name, setting', [('highest', 'HIGHEST'), ('high', 'HIGH')])
def test_precision_reaches_every_dot_and_convolution(name, setting):
  model = repmlp_jax.create_model(TINY, num_classes=NUM_CLASSES, precision=name)
  assert model.precision == jax.lax.Precision[setting]
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  ops = _dots_and_convs(jax.jit(model.apply).lower(variables, x).as_text())
  # Each op names the precision of both operands: 'precision = [HIGHEST, HIGHEST]'.
  assert ops and all(len(re.findall(rf'\b{setting}\b', op)) == 2 for op in ops), ops[:3]


def test_precision_and_dtype_settings_are_checked():
  config = tiny_config(precision='highest', dtype='bfloat16')
  model = experiment.build_model(config, NUM_CLASSES)
  assert (model.precision, model.dtype) == (jax.lax.Precision.HIGHEST, jnp.bfloat16)
  assert repmlp_jax.create_model(TINY, precision='default').precision is None
  with pytest.raises(ValueError, match="Unknown precision 'fastest'.*default, high, highest"):
    repmlp_jax.create_model(TINY, precision='fastest')
  with pytest.raises(ValueError, match="Unknown compute dtype 'int8'.*float32, bfloat16"):
    repmlp_jax.create_model(TINY, dtype='int8')


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients(float32_experiment):
  k = 4
  exp = one_device_experiment(tiny_config(grad_accum_steps=k))
  single = float32_experiment
  state = single.init_state()  # The state does not depend on grad_accum_steps.
  batch = batches(1)[0]
  images, labels = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  # The step's own (smoothed) targets, so that the train step below sees these gradients.
  rng = jax.random.fold_in(state['rng'], state['step'])
  _, targets = exp._targets(rng, images, labels)  # pylint: disable=protected-access
  loss, logits, _, grads = jax.jit(exp.gradients)(state['params'], state['batch_stats'], images,
                                                  targets)
  # One by one: micro-batch m holds the examples m, m + k, m + 2k, ...
  micro_gradients = jax.jit(single.gradients)
  micro = [micro_gradients(state['params'], state['batch_stats'], images[m::k], targets[m::k])
           for m in range(k)]
  mean_grads = jax.tree.map(lambda *g: sum(g) / k, *[m[3] for m in micro])
  _assert_trees_close(grads, mean_grads)
  np.testing.assert_allclose(loss, np.mean([m[0] for m in micro]), rtol=1e-6)
  np.testing.assert_allclose(logits[1::k], micro[1][1], rtol=1e-5, atol=1e-6)  # Batch order.

  # The train step applies one optimizer update with that mean gradient.
  new_state, _ = exp.train_step(jax.tree.map(jnp.copy, state),
                                sharding.global_batch(batch, exp.batch_sharding))

  @jax.jit  # One compile instead of the eager optimizer's many small ones.
  def one_update(grads, opt_state, params):
    return optax.apply_updates(params, exp.tx.update(grads, opt_state, params)[0])

  _assert_trees_close(new_state['params'], one_update(grads, state['opt_state'], state['params']))


def _assert_trees_close(got, expected, rtol=1e-5):
  """Every array within rtol of its largest entry, floored at 1% of the tree's largest entry
  (arrays that are zero up to round-off are compared on the tree's scale)."""
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(expected))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-2 * scale)
    assert err < rtol, f'{jax.tree_util.keystr(path)}: error {err}'


def test_wrong_grad_accum_steps_fail_before_compiling():
  with pytest.raises(ValueError, match='grad_accum_steps must be a positive integer; got 0'):
    one_device_experiment(tiny_config(grad_accum_steps=0))
  with pytest.raises(ValueError, match='grad_accum_steps=3 does not divide the per-device batch '
                                       'of 16'):
    one_device_experiment(tiny_config(grad_accum_steps=3))
  with pytest.raises(ValueError, match='per-device batch of 2 .* over 8 devices'):
    experiment.Experiment(tiny_config(grad_accum_steps=4), num_classes=NUM_CLASSES,
                         steps=tiny_steps())  # Every device: 16 / 8 = 2 examples each.


def test_short_bfloat16_digits_schedule_with_grad_accum_learns(tmp_path):
  """The digits recipe in bfloat16 with grad_accum_steps=2, cut to 88 steps (4 epochs), on two
  stages of the tiny variant (the digits model's compile took most of this test's time).

  Measured on CPU: 51% top-1 (deploy form 52%; 43% after 44 steps); chance is 10%, and with a
  learning rate of 0 the same run stays near chance. The bound leaves room for other machines'
  rounding.
  """
  config = digits.get_config()
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))
  config.update(dtype='bfloat16', grad_accum_steps=2, num_train_steps=88, warmup_epochs=0.5,
                eval_every_epochs=100.0, checkpoint_every_steps=88, log_every_steps=88)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 88 and result['count'] == 359
  assert result['top1'] >= 0.35 and result['deploy_top1'] >= 0.35
