"""configs/cifar10_pure_mlp.py: the paper's CIFAR-10 recipe trains under tfds.testing.mock_data."""

import numpy as np
import optax
import tensorflow_datasets as tfds

from configs import cifar10_pure_mlp
from configs import common
from repmlp_jax.train import optim
from repmlp_jax.train import trainer


def test_recipe_is_the_papers():
  config = cifar10_pure_mlp.get_config()
  assert (config.model, config.dataset, config.image_size) == ('RepMLP-CIFAR-PureMLP', 'cifar10', 32)
  assert (config.global_batch_size, config.num_epochs, config.optimizer) == (128, 100.0, 'sgd')
  assert config.mixup_alpha == config.cutmix_alpha == config.label_smoothing == 0.0


def test_sgd_applies_momentum_and_masked_l2_decay():
  config = common.get_config()
  config.update(optimizer='sgd', weight_decay=0.5, grad_clip_norm=0.0, sgd_momentum=0.9)
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  params = {'kernel': np.ones((2, 2), np.float32), 'bias': np.ones((2,), np.float32)}
  grads = {'kernel': np.zeros((2, 2), np.float32), 'bias': np.zeros((2,), np.float32)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5)  # decay on kernels only
  np.testing.assert_allclose(updates['bias'], 0.0)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * 1.9)  # momentum carries over


def test_unknown_optimizer_is_refused():
  config = common.get_config()
  config.optimizer = 'lamb'
  try:
    optim.create_optimizer(config, optax.constant_schedule(0.1))
  except ValueError as e:
    assert 'lamb' in str(e)
  else:
    raise AssertionError('an unknown optimizer was accepted')


def test_trains_a_few_steps_on_mock_cifar10(tmp_path):
  config = cifar10_pure_mlp.get_config()
  config.global_batch_size = config.eval_batch_size = 8
  config.num_train_steps = 2
  # One unit per stage and narrow stages (as tests/small_models.py): the recipe, not the model's
  # size, is under test here, and the compile time is most of the test's.
  config.model_overrides.update(channels=(4, 8, 8), depths=(1, 1, 1))
  config.eval_every_epochs = 100.0
  with tfds.testing.mock_data(num_examples=16):
    result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2 and result['count'] == 16
  assert abs(result['deploy_top1'] - result['top1']) <= 1 / 16
