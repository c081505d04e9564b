"""What the commands print when something is wrong: one line that names the path, field or model,
the exit status, the mode of the files they write, and plain progress lines in a log.

train.py's argument errors run as subprocesses (they must fail before jax and TensorFlow load,
in about a second); convert.py and predict.py run through their main(argv).
"""

import errno
import io
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

import convert
import predict
import repmlp_jax
from repmlp_jax import model_io
from repmlp_jax.train import metric_writers
from tests import torch_checkpoints as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '_RepMLPNet-Tiny'


def run_train_py(*args: str) -> tuple[int, list[str]]:
  """train.py as a user runs it: exit status and every line it printed (stdout and stderr)."""
  env = {**os.environ, 'PYTHONPATH': ROOT}
  done = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=env, timeout=300,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
  return done.returncode, done.stdout.splitlines()


@pytest.mark.parametrize('args, expected', [
    (['--config', 'configs/digit.py'],
     'no config file at configs/digit.py (--config); did you mean configs/digits.py?'),
    (['--config', 'configs/digits.py', '--config.num_epoch=3'],
     'unknown config field num_epoch (--config.num_epoch); did you mean num_epochs?'),
    (['--config', 'configs/digits.py', '--config.model_overrides.chanels=3'],
     'did you mean model_overrides.channels?'),
    (['--config', 'configs/digits.py', '--config.num_epochs=abc'],
     "--config.num_epochs=abc: could not convert string to float: 'abc'"),
])
def test_train_py_argument_errors_are_one_line(args, expected, tmp_path):
  code, lines = run_train_py(*args, '--workdir', str(tmp_path / 'work'))
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith('train.py: error: ') and expected in lines[0]
  assert not (tmp_path / 'work').exists()


def test_train_py_help_exits_zero():
  code, lines = run_train_py('--help')
  assert code == 0
  assert lines[0].startswith('Trains a RepMLPNet') and any('--workdir' in line for line in lines)


def test_unwritable_workdir_fails_before_any_work(tmp_path):
  afile = tmp_path / 'a_file'
  afile.write_text('')
  code, lines = run_train_py('--config', 'configs/digits.py', '--workdir', str(afile / 'work'))
  assert code == 1 and len(lines) == 1, lines
  assert lines[0] == (f'train.py: error: Cannot write to the workdir {afile}/work (not a '
                      'directory); choose another --workdir or fix its permissions.')


def test_start_is_silent_and_a_run_error_is_one_line(tmp_path):
  # Fails after jax and TensorFlow have loaded: their start-up lines would show here.
  code, lines = run_train_py('--config', 'configs/digits.py', '--workdir', str(tmp_path),
                             f'--config.data_dir={tmp_path}/nowhere')
  assert code == 1 and len(lines) == 1, lines
  assert lines[0].startswith(f"train.py: error: config.data_dir='{tmp_path}/nowhere' does not "
                             'exist.')


@pytest.fixture(name='training_file')
def _training_file(tmp_path):
  path = tmp_path / 'tiny-train.pth'
  torch.save(tc.tiny_torch_model().state_dict(), path)
  return path


def test_wrong_model_names_both_models_in_few_lines(training_file, tmp_path, capsys):
  assert convert.main(['import', str(training_file), str(tmp_path / 'a'), '--model', 'b224']) == 1
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) <= 12, lines
  assert 'RepMLPNet-B224 (training form)' in lines[0]
  assert 'the file holds _RepMLPNet-Tiny (training form)' in lines[0]
  assert 'drop --model' in lines[0] and lines[-1].endswith('--verbose lists every key.')
  missing = next(line for line in lines if 'missing key(s)' in line)
  assert missing.endswith('more)') and missing.count(', ') <= 5

  assert convert.main(['import', str(training_file), str(tmp_path / 'a'), '--model', 'b224',
                       '--verbose']) == 1
  verbose = capsys.readouterr().err.splitlines()
  missing = next(line for line in verbose if 'missing key(s)' in line)
  count = int(missing.split(': ')[-2].split()[-3])
  assert len(missing.split(': ')[-1].split(', ')) == count > 4
  assert not (tmp_path / 'a').exists()


@pytest.fixture(scope='module', name='model_dir')
def _model_dir(tmp_path_factory):
  model = repmlp_jax.create_model(TINY, num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model_io.save_model(tmp_path_factory.mktemp('model') / 'tiny', model, variables)


def test_wrong_paths_are_one_plain_line(model_dir, tmp_path, capsys):
  not_a_checkpoint = tmp_path / 'photos'
  not_a_checkpoint.mkdir()
  Image.new('RGB', (40, 40)).save(not_a_checkpoint / 'cat.png')

  assert convert.main(['export', str(not_a_checkpoint), str(tmp_path / 'out.pth')]) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and f'{not_a_checkpoint} is not a model directory' in err[0]
  assert '\\' not in err[0]

  assert predict.main(['--checkpoint', str(not_a_checkpoint), str(tmp_path / 'x.png')]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and f'{not_a_checkpoint} is not a model directory' in err[0]

  assert predict.main(['--checkpoint', model_dir, str(not_a_checkpoint)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == [f'predict.py: error: {not_a_checkpoint} is a directory; give image files '
                 f'(e.g. {not_a_checkpoint}/*.jpg).']

  missing = tmp_path / 'nowhere'
  assert convert.main(['reparam', str(missing), str(tmp_path / 'deploy')]) == 1
  err = capsys.readouterr().err.splitlines()
  assert err == [f'convert.py reparam: error: No checkpoint at {missing}: give a model directory '
                 'of this package, a hub directory or a PyTorch .pth / .safetensors file.']


def test_export_to_an_existing_file_is_refused_before_loading(model_dir, tmp_path, capsys,
                                                             monkeypatch):
  taken = tmp_path / 'taken.bin'
  taken.write_bytes(b'keep me')

  def no_loading(*args, **kwargs):
    raise AssertionError('the model was loaded before the output was checked')

  monkeypatch.setattr(predict.inference.Predictor, 'from_checkpoint', no_loading)
  assert predict.main(['--checkpoint', model_dir, '--export', str(taken)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and f'{taken} already exists' in err[0]
  assert taken.read_bytes() == b'keep me'


def _modes(path):
  return {os.path.relpath(os.path.join(root, name), path): stat.S_IMODE(os.stat(
      os.path.join(root, name)).st_mode) for root, dirs, files in os.walk(path)
          for name in dirs + files} if os.path.isdir(path) else {
              '': stat.S_IMODE(os.stat(path).st_mode)}


def test_written_files_follow_the_umask(model_dir, tmp_path, capsys):
  previous = os.umask(0o027)
  try:
    assert convert.main(['export', model_dir, str(tmp_path / 'tiny.pth')]) == 0
    assert predict.main(['--checkpoint', model_dir, '--export', str(tmp_path / 'tiny.bin')]) == 0
    assert convert.main(['reparam', model_dir, str(tmp_path / 'deploy')]) == 0
  finally:
    os.umask(previous)
  capsys.readouterr()
  assert _modes(tmp_path / 'tiny.pth') == {'': 0o640}
  assert _modes(tmp_path / 'tiny.bin') == {'': 0o640}
  modes = _modes(tmp_path / 'deploy')
  assert modes and all(mode == (0o750 if os.path.isdir(tmp_path / 'deploy' / name) else 0o640)
                       for name, mode in modes.items()), modes


def test_a_full_disk_leaves_one_line_and_no_partial_file(model_dir, tmp_path, capsys,
                                                         monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  async def full_orbax(self, directory, *args, **kwargs):  # After its temporary directory exists.
    full(None)

  monkeypatch.setattr(os, 'fsync', full)  # Where a full disk shows at the latest.
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', full_orbax)
  out = tmp_path / 'out'
  out.mkdir()
  assert convert.main(['export', model_dir, str(out / 'tiny.pth')]) == 1
  assert predict.main(['--checkpoint', model_dir, '--export', str(out / 'tiny.bin')]) == 2
  assert convert.main(['reparam', model_dir, str(out / 'deploy')]) == 1
  err = capsys.readouterr().err.splitlines()
  assert err == [
      f'convert.py export: error: Cannot write {out}/tiny.pth: no space left on device.',
      f'predict.py: error: Cannot write {out}/tiny.bin: no space left on device.',
      f'convert.py reparam: error: Cannot write {out}/deploy: no space left on device.']
  assert os.listdir(out) == []


def test_plain_progress_lines_when_not_a_terminal(monkeypatch):
  clock = iter([1000.0, 1001.0, 1002.0, 1003.0])  # One second per step after the first.
  monkeypatch.setattr(metric_writers.time, 'monotonic', lambda: next(clock))
  out = io.StringIO()
  bar = metric_writers.ProgressBar(total_steps=100, start_step=50, images_per_step=10,
                                   enabled=True, interactive=False, interval_s=0.0, stream=out)
  for step in (51, 52, 53, 54):
    bar.update(step, loss=2.0)
  bar.write('done')
  bar.close()
  lines = out.getvalue().splitlines()
  assert '\r' not in out.getvalue() and len(lines) == 5
  assert lines[0] == 'step 51/100 (51%), loss 2'  # No rate yet: the first step compiled.
  # Resumed at step 50: the rate counts only this start's steps after the first (1 step/s).
  assert lines[1] == 'step 52/100 (52%), 10.0 img/s, ETA 0:00:48, loss 2'
  assert lines[3] == 'step 54/100 (54%), 10.0 img/s, ETA 0:00:46, loss 2'


def test_a_real_full_disk(model_dir, tmp_path, capsys):
  """A 64 KiB tmpfs, where the test may mount one (root on Linux); the tiny model needs more."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(disk)],
                           capture_output=True, check=False).returncode == 0
  if not mounted:
    pytest.skip('cannot mount a tmpfs here')
  try:
    assert convert.main(['reparam', model_dir, str(disk / 'deploy')]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f'convert.py reparam: error: Cannot write {disk}/deploy: no space left on device.']
    assert os.listdir(disk) == []
  finally:
    subprocess.run(['umount', str(disk)], check=True)
