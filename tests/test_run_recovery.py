"""A long run's accidents: a damaged latest checkpoint, a full disk while saving, a changed config,
a requested stop. Each runs train.py's main in this process (the digits runs share one compiled
Experiment, as a caller of train_and_evaluate may) and checks what it prints and its exit status.
"""

import contextlib
import errno
import io
import json
import os
import shutil
import sys
from unittest import mock

import pytest
from absl import flags
import orbax.checkpoint as ocp

from repmlp_jax.commands import cli
from repmlp_jax.train import checkpointing
from repmlp_jax.train import experiment
from repmlp_jax.data import input_pipeline
from repmlp_jax.train import recovery
from repmlp_jax.train import trainer
from tests import test_train_loop as loop

import train  # pylint: disable=g-bad-import-order  (repository root)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command line of tests/test_train_loop.digits_config(): the same compiled Experiment.
OVERRIDES = [f'--config.num_train_steps={loop.TOTAL_STEPS}', '--config.eval_every_epochs=100.0',
             '--config.checkpoint_every_steps=2', '--config.log_every_steps=1']


def run_train_py(workdir, *extra: str) -> int:
  """train.py's main as the command line runs it, in this process."""
  argv = ['train.py', '--config', os.path.join(ROOT, 'configs/digits.py'), '--workdir',
          str(workdir), *OVERRIDES, *extra]
  try:
    with mock.patch.object(sys, 'argv', argv):  # config_flags reads the overrides from sys.argv.
      train.parse_flags(argv)
    return train.main(['train.py'])
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)  # config_flags defines one flag per override at each parse.


def read_records(workdir):
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def tmp_dirs(directory):
  return [n for n in os.listdir(directory) if 'orbax-checkpoint-tmp' in n]


@pytest.fixture(scope='module', autouse=True)
def _one_compiled_experiment():
  """train.py's runs of the digits config reuse one Experiment instead of compiling it again."""
  shared = trainer.build_experiment(loop.digits_config())
  run = trainer.train_and_evaluate

  def with_shared(config, workdir, *, exp=None):
    return run(config, workdir, exp=exp or (shared if shared.built_from(config) else None))

  with pytest.MonkeyPatch.context() as m:
    m.setattr(trainer, 'train_and_evaluate', with_shared)
    yield


def _stop_at(workdir, step):
  """train.py stopped on request at `step`; a copy of that checkpoint is kept beside workdir."""
  printed = io.StringIO()
  with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(printed):
    m.setattr(checkpointing.Checkpoints, 'reached_preemption', lambda self, s: s == step)
    stopped = run_train_py(workdir)
  shutil.copytree(workdir / 'checkpoints' / str(step), workdir.parent / f'step{step}')
  return stopped, printed.getvalue().splitlines()


@pytest.fixture(scope='module', name='three_checkpoints')
def _three_checkpoints(tmp_path_factory):
  """A run stopped on request at steps 2 and 3, then resumed to the end: checkpoints 2, 3, 4.

  Three, so that the newest readable checkpoint is not also the oldest once 4 is damaged.

  Returns:
    (workdir, the last eval line of metrics.jsonl, (exit status, lines printed) of the stop).
  """
  workdir = tmp_path_factory.mktemp('digits_three_checkpoints')
  first_stop = _stop_at(workdir, 2)
  _stop_at(workdir, 3)
  assert run_train_py(workdir) == 0
  for step in (2, 3):  # Only the last and the best are kept by the run itself.
    if not os.path.exists(workdir / 'checkpoints' / str(step)):
      shutil.copytree(workdir.parent / f'step{step}', workdir / 'checkpoints' / str(step))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3', '4']
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    final = [line for line in f if 'eval/top1' in line][-1]
  return workdir, final, first_stop


def copy_of(three_checkpoints, tmp_path):
  workdir = tmp_path / 'work'
  shutil.copytree(three_checkpoints[0], workdir)
  return workdir


def damage(workdir, step):
  """Truncates every data file of checkpoint `step` to half its size, as a bad copy would.

  Every file, not only the largest: which data files a restore reads differs between orbax
  versions (under 0.11.36 a restore did not notice the largest process file truncated).
  """
  files = [os.path.join(root, name) for root, _, names in
           os.walk(workdir / 'checkpoints' / str(step)) for name in names
           if os.path.basename(root) == 'd']  # tensorstore's data files; not the metadata.
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def test_requested_stop_prints_one_line_and_exits_75(three_checkpoints):
  workdir, _, (code, lines) = three_checkpoints
  assert code == cli.EXIT_STOPPED == 75
  assert not [line for line in lines if 'top-1' in line]  # Stopped before any evaluation.
  assert [line for line in lines if 'Stopped' in line] == [
      f'Stopped at step 2 on request; checkpoint saved in {workdir}/checkpoints. Rerun the same '
      'command to resume.']


def test_damaged_latest_checkpoint_falls_back_to_the_newest_readable(three_checkpoints, tmp_path,
                                                                     capsys):
  workdir = copy_of(three_checkpoints, tmp_path)
  shutil.rmtree(workdir / 'deploy')
  damage(workdir, 4)
  logged = read_records(workdir)
  capsys.readouterr()
  assert run_train_py(workdir) == 0
  out = capsys.readouterr().out.splitlines()
  warnings = [line for line in out if 'cannot be read' in line]
  assert warnings == [f'Warning: checkpoint step 4 cannot be read (moved to {workdir}/'
                      'damaged_checkpoints); resuming from step 3.']  # Not the older step 2.
  trained = [r['step'] for r in read_records(workdir)[len(logged):] if 'train/loss' in r]
  assert trained == [4]  # Restored step 3 indeed: only step 4 was trained again.
  assert os.listdir(workdir / 'damaged_checkpoints') == ['4']  # Kept, not deleted.
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    final = [line for line in f if 'eval/top1' in line][-1]
  assert final == three_checkpoints[1]  # Step 4 again, exactly as the first time.
  assert os.path.isdir(workdir / 'deploy')


def test_no_readable_checkpoint_is_one_line_and_no_fresh_start(three_checkpoints, tmp_path,
                                                               capsys):
  workdir = copy_of(three_checkpoints, tmp_path)
  for step in (2, 3, 4):
    damage(workdir, step)
  capsys.readouterr()
  assert run_train_py(workdir) == cli.EXIT_USAGE  # An unreadable input.
  err = capsys.readouterr().err.splitlines()
  assert err == [f'train.py: error: No checkpoint in {workdir}/checkpoints can be read (steps 4, '
                 '3, 2 are damaged); restore them from a copy, or move them away to start this '
                 'run from scratch.']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3', '4']


def test_changed_model_is_one_line_naming_the_field(three_checkpoints, tmp_path, capsys):
  workdir = copy_of(three_checkpoints, tmp_path)
  with open(workdir / 'config.json', encoding='utf-8') as f:
    written = f.read()
  assert run_train_py(workdir, '--config.model_overrides.channels=(16,32,64,128)') == \
      cli.EXIT_USAGE  # A wrong model.
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f'train.py: error: {workdir} holds checkpoints (step 4) of another '
                           'model or state layout (the config differs from the one that wrote '
                           'them: model_overrides.channels: [16, 32, 64, 64] -> [16, 32, 64, '
                           '128]')
  assert err[0].endswith('use another --workdir, or the config that wrote them (its '
                         'config.json).')
  with open(workdir / 'config.json', encoding='utf-8') as f:
    assert f.read() == written  # The refused start did not claim the workdir.


def test_resumable_settings_may_change(three_checkpoints):
  config = loop.digits_config()
  config.num_train_steps, config.log_every_steps, config.eval_every_epochs = 6, 3, 1.0
  info = input_pipeline.dataset_info(config.dataset)
  exp = experiment.Experiment(config, num_classes=info.num_classes,
                             steps=experiment.derive_steps(config, info.num_train_examples))
  ckpts = checkpointing.Checkpoints(three_checkpoints[0] / 'checkpoints')
  try:
    state = recovery.restore_newest_readable(ckpts, exp.abstract_state, config, warn=print)
  finally:
    ckpts.close()
  assert int(state['step']) == 4


def _full_disk(monkeypatch):
  """Every orbax array write fails as on a full disk (after orbax made its temporary directory)."""

  async def full(self, directory, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', full)


def test_full_disk_while_saving_then_resume(three_checkpoints, tmp_path, capsys, monkeypatch):
  workdir = copy_of(three_checkpoints, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  shutil.rmtree(workdir / 'deploy')
  with monkeypatch.context() as m:
    _full_disk(m)
    assert run_train_py(workdir) == cli.EXIT_ERROR
  err = capsys.readouterr().err.splitlines()
  assert err == [f'train.py: error: Cannot write {workdir}/checkpoints/4: no space left on device; '
                 f'the last good checkpoint is step 3 in {workdir}/checkpoints; free space, then '
                 'rerun the same command to resume.']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  assert not tmp_dirs(workdir / 'checkpoints')
  assert run_train_py(workdir) == 0  # Space freed: the same command resumes from step 3.
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    assert [line for line in f if 'eval/top1' in line][-1] == three_checkpoints[1]


def test_full_disk_while_writing_the_deploy_model(three_checkpoints, tmp_path, capsys,
                                                  monkeypatch):
  workdir = copy_of(three_checkpoints, tmp_path)
  shutil.rmtree(workdir / 'deploy')
  with monkeypatch.context() as m:
    _full_disk(m)
    assert run_train_py(workdir) == cli.EXIT_ERROR
  err = capsys.readouterr().err.splitlines()
  assert err == [f'train.py: error: Cannot write {workdir}/deploy: no space left on device; the '
                 f'trained state is kept in {workdir}/checkpoints (step 4); free space, then '
                 'rerun the same command to write it.']
  assert not os.path.exists(workdir / 'deploy') and not tmp_dirs(workdir)
