"""train.py as a real process: SIGTERM (a real signal, not a patched flag) saves a checkpoint and
stops; rerunning resumes to the bits of an uninterrupted run. And `init_from` through
train_and_evaluate.

The two train.py runs start together (one core each), then the stopped one is resumed. The stop's
exit status is not checked here (its value is train.py's business); what is checked is the
outcome: a checkpoint before the last step, no deploy model yet, and after the resume the same
final state, deploy model and evaluation as the run that was never stopped.
"""

import json
import os
import signal
import subprocess
import sys
import time

import chex

from configs import digits
from repmlp_jax import model_io
from repmlp_jax.data import input_pipeline
from repmlp_jax.train import experiment
from repmlp_jax.train import trainer
from tests import fast_init
from tests import test_train_loop as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100  # Long enough that the signal always arrives well before the end (~1 s per 10).
BATCH = 16  # A quarter of the digits batch: cheap steps.
# Two stages of the tiny variant: each of the three processes compiles in a fraction of the
# digits model's time (the same overrides as the init_from test below).
SMALL_MODEL = {'channels': (8, 16), 'depths': (1, 1), 'partitions': (4, 2), 'sharesets': (2, 4)}
FLAGS = [f'--config.num_train_steps={STEPS}', f'--config.global_batch_size={BATCH}',
         '--config.eval_every_epochs=1000.0', '--config.checkpoint_every_steps=1000',
         '--config.log_every_steps=1']
# train.py takes a config file; the command line cannot add fields (depths) the file lacks.
SMALL_CONFIG = f'''"""configs/digits.py on a smaller model."""
from configs import digits


def get_config():
  config = digits.get_config()
  config.model_overrides.update({SMALL_MODEL!r})
  return config
'''


def _config():
  config = digits.get_config()
  config.model_overrides.update(SMALL_MODEL)
  config.num_train_steps = STEPS
  config.global_batch_size = BATCH
  config.eval_every_epochs = 1000.0
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 1
  return config


def _train(workdir, config_file):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.Popen(
      [sys.executable, 'train.py', '--config', config_file, '--workdir', workdir] + FLAGS,
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line)['step'] for line in f if 'train/loss' in line]


def test_sigterm_to_train_py_checkpoints_and_resumes_exactly(tmp_path):
  stopped_dir, reference_dir = str(tmp_path / 'stopped'), str(tmp_path / 'reference')
  config_file = tmp_path / 'small_digits.py'
  config_file.write_text(SMALL_CONFIG)
  stopped, reference = _train(stopped_dir, config_file), _train(reference_dir, config_file)
  deadline = time.time() + 900
  while not _logged_steps(stopped_dir):  # The loop runs (and the handler is installed).
    assert stopped.poll() is None, stopped.communicate()[0][-3000:]
    assert time.time() < deadline, 'train.py logged no step in 15 minutes'
    time.sleep(0.05)
  os.kill(stopped.pid, signal.SIGTERM)
  out = stopped.communicate(timeout=600)[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(stopped_dir, 'checkpoints')))
  assert len(steps) == 1 and 1 <= steps[0] < STEPS, (steps, out[-3000:])
  assert not os.path.exists(os.path.join(stopped_dir, 'deploy'))
  assert max(_logged_steps(stopped_dir)) == steps[0]

  resumed = _train(stopped_dir, config_file)
  for process in (resumed, reference):
    out = process.communicate(timeout=900)[0]
    assert process.returncode == 0, out[-3000:]
  # Bit-identical: final state, deploy model, final evaluation.
  exp = trainer.build_experiment(_config())
  got = tl.restore_final_state(exp, stopped_dir, STEPS)
  want = tl.restore_final_state(exp, reference_dir, STEPS)
  chex.assert_trees_all_equal(want, got)
  deploy = [model_io.load_model(os.path.join(d, 'deploy')) for d in (stopped_dir, reference_dir)]
  assert deploy[0][0] == deploy[1][0]
  chex.assert_trees_all_equal(deploy[0][1], deploy[1][1])
  evals = [[r for r in tl.read_jsonl(d) if 'eval/top1' in r] for d in (stopped_dir, reference_dir)]
  assert evals[0] == evals[1] and evals[0][-1]['step'] == STEPS


def test_init_from_loads_the_saved_weights_through_train_and_evaluate(tmp_path):
  config = digits.get_config()
  config.model_overrides.update(SMALL_MODEL)
  config.num_train_steps = 1
  config.base_lr = config.warmup_lr = config.min_lr = 0.0  # The weights stay as loaded.
  config.eval_every_epochs = 1000.0
  info = input_pipeline.dataset_info(config.dataset)
  model = experiment.build_model(config, info.num_classes)
  variables = fast_init.random_variables(model, (1, 32, 32, 3), seed=7)
  model_io.save_model(tmp_path / 'pretrained', model, variables)
  config.init_from = str(tmp_path / 'pretrained')
  result = trainer.train_and_evaluate(config, str(tmp_path / 'work'))
  assert result['step'] == 1
  state = tl.restore_final_state(trainer.build_experiment(config), str(tmp_path / 'work'), 1)
  chex.assert_trees_all_equal(variables['params'], state['params'])
  assert int(state['step']) == 1
