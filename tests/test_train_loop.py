"""train_and_evaluate end to end: tfds mock data, the embedded digits default, interrupt and
resume, the NaN guard, and the errors a user meets first.

The digits runs share one config, so they reuse one compiled Experiment (passed as `exp`).
Interrupt-and-resume is compared bitwise: the same programs on the same inputs on one machine.
"""

import glob
import json
import os

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from repmlp_jax.train import checkpointing
from repmlp_jax import model_io
from repmlp_jax.train import trainer
from tests import digits_run

TOTAL_STEPS = digits_run.TOTAL_STEPS
digits_config = digits_run.config


def restore_final_state(exp, workdir, step):
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    return jax.device_get(ckpts.restore(exp.abstract_state, step))
  finally:
    ckpts.close()


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def digits_experiment():
  return digits_run.experiment()


@pytest.fixture(scope='module')
def uninterrupted():
  run = digits_run.run()  # The run other test files read too: trained once per process.
  return run.workdir, run.result


def test_digits_default_runs_and_writes_everything(uninterrupted):
  workdir, result = uninterrupted
  assert result['step'] == TOTAL_STEPS and result['count'] == 359  # The whole test split.
  # The deploy form is evaluated separately from the training form and must agree.
  assert abs(result['deploy_top1'] - result['top1']) <= 1 / 359
  assert abs(result['deploy_top5'] - result['top5']) <= 1 / 359
  records = read_jsonl(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, TOTAL_STEPS + 1))
  assert {'train/lr', 'train/grad_norm', 'train/param_norm', 'train/update_norm'} <= set(records[0])
  assert any('eval/deploy_top1' in r for r in records)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(TOTAL_STEPS)]
  model, variables = model_io.load_model(os.path.join(workdir, 'deploy'))
  assert model.deploy and 'fc3_bias' in variables['params']['stages_0_0']['repmlp_block']


def test_interrupt_and_resume_equals_uninterrupted(uninterrupted, digits_experiment, tmp_path,
                                                    monkeypatch):
  reference_dir, reference = uninterrupted
  workdir = str(tmp_path)
  config = digits_config()
  with monkeypatch.context() as m:  # A preemption notice arrives at step 2.
    m.setattr(checkpointing.Checkpoints, 'reached_preemption', lambda self, step: step == 2)
    stopped = trainer.train_and_evaluate(config, workdir, exp=digits_experiment)
  assert stopped == {'step': 2, 'preempted': True}
  assert not os.path.exists(os.path.join(workdir, 'deploy'))
  resumed = trainer.train_and_evaluate(config, workdir, exp=digits_experiment)
  assert resumed == reference
  expected = restore_final_state(digits_experiment, reference_dir, TOTAL_STEPS)
  got = restore_final_state(digits_experiment, workdir, TOTAL_STEPS)
  chex.assert_trees_all_equal(expected, got)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits_experiment, tmp_path,
                                                            monkeypatch):
  original = trainer._train_batches

  def poisoned(config, start_step):  # The third batch (step 3) holds a NaN pixel.
    for i, batch in enumerate(original(config, start_step)):
      if start_step + i == 2:
        batch = {**batch, 'image': batch['image'].copy()}
        batch['image'][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(trainer, '_train_batches', poisoned)
  with pytest.raises(FloatingPointError, match=r'loss became nan at step 3.*step 2\)'):
    trainer.train_and_evaluate(digits_config(), str(tmp_path), exp=digits_experiment)
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
  state = restore_final_state(digits_experiment, str(tmp_path), 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_an_experiment_of_another_config_is_refused(digits_experiment, tmp_path):
  config = digits_config()
  config.seed += 1  # Would train other weights than the compiled functions' config.
  with pytest.raises(ValueError, match='built from another config'):
    trainer.train_and_evaluate(config, str(tmp_path / 'work'), exp=digits_experiment)
  assert not (tmp_path / 'work').exists()  # Refused before anything was written.


def test_stop_request_on_sigterm():
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGTERM)
  stop = checkpointing.StopRequest()
  try:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGTERM) is before


def test_missing_data_dir_and_unknown_variant_fail_clearly(tmp_path):
  config = common.get_config()
  config.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='data_dir=.*nowhere.* does not exist'):
    trainer.train_and_evaluate(config, str(tmp_path / 'work'))
  config.data_dir = str(tmp_path)  # Exists, but ImageNet was never built there.
  with pytest.raises(FileNotFoundError, match="'imagenet2012' is not prepared.*tfds build"):
    trainer.train_and_evaluate(config, str(tmp_path / 'work'))
  config.dataset, config.data_dir = 'image_folder', None
  with pytest.raises(ValueError, match="'image_folder' needs --config.data_dir"):
    trainer.train_and_evaluate(config, str(tmp_path / 'work'))
  config = digits_config()
  config.model = 'RepMLPNet-B999'
  with pytest.raises(ValueError, match="Unknown model 'RepMLPNet-B999'"):
    trainer.train_and_evaluate(config, str(tmp_path / 'work'))


def test_full_run_on_tfds_mock_cifar10(tmp_path):
  config = common.get_config()  # The official recipe: mixup/CutMix, RandAugment, AdamW.
  config.model = '_RepMLPNet-Tiny'
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))  # Two stages: half the compile time.
  config.dataset = 'cifar10'
  config.dtype = 'float32'  # A CPU run (the ImageNet recipe's default is bfloat16).
  config.image_size = config.eval_image_size = 32
  config.preprocess_overrides.randaugment_layers = 2
  config.global_batch_size = config.eval_batch_size = 8
  config.num_epochs = 2.0  # 24 mock examples: 3 steps per epoch.
  config.warmup_epochs = 1.0
  config.eval_every_epochs = 1.0
  with tfds.testing.mock_data(num_examples=24):
    result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 6 and result['count'] == 24
  assert abs(result['deploy_top1'] - result['top1']) <= 1 / 24
  evals = [r for r in read_jsonl(str(tmp_path)) if 'eval/top1' in r]
  assert [r['step'] for r in evals] == [3, 6]
  # Last and best kept (the best is step 3 or 6, possibly the same).
  assert '6' in os.listdir(tmp_path / 'checkpoints')
  assert len(os.listdir(tmp_path / 'checkpoints')) <= 2
