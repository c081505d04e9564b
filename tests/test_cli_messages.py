"""What the commands print when something is wrong: one line that names the path, field or model,
the exit status, the mode of the files they write, plain progress lines in a log, the last line
of a run, configs by name, and what a failed start leaves behind.

train.py's argument errors run as subprocesses (they must fail before jax and TensorFlow load,
in about a second); convert.py and predict.py run through their main(argv).
"""

import errno
import io
import os
import stat
import subprocess
import sys
import warnings

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
from repmlp_jax.commands import cli
from repmlp_jax.train import metric_writers
from repmlp_jax.train import trainer
from tests import digits_run
from tests import helpers
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
    # A config by its name in configs/: found (the override is checked against it), or not.
    (['--config', 'imagenet_b224', '--config.num_epoch=3'], 'did you mean num_epochs?'),
    (['--config', 'imagenet_b224.py', '--config.bn_group_sise=3'], 'did you mean bn_group_size?'),
    (['--config', 'imagenet_b22'], 'nearest known configs: imagenet_b224, '),
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
  assert code == cli.EXIT_USAGE and len(lines) == 1, lines
  assert lines[0] == (f'train.py: error: Cannot write to the workdir {afile}/work (not a '
                      'directory); choose another --workdir or fix its permissions.')


def test_start_is_silent_and_a_run_error_is_one_line(tmp_path):
  # Fails after jax and TensorFlow have loaded: their start-up lines would show here.
  code, lines = run_train_py('--config', 'configs/digits.py', '--workdir', str(tmp_path),
                             f'--config.data_dir={tmp_path}/nowhere')
  assert code == cli.EXIT_USAGE and len(lines) == 1, lines  # A missing input.
  assert lines[0].startswith(f"train.py: error: config.data_dir='{tmp_path}/nowhere' does not "
                             'exist.')
  assert os.listdir(tmp_path) == []  # The failed start left nothing in the workdir.


@pytest.mark.parametrize('config, expected', [
    ('imagenet_b224.py', "'imagenet2012' is not prepared"),  # No ImageNet here.
    ('finetune_b224', "dataset='image_folder' needs --config.data_dir"),
])
def test_a_failed_start_leaves_no_workdir(config, expected, tmp_path):
  workdir = tmp_path / 'new' / 'work'
  code, lines = run_train_py('--config', config, '--workdir', str(workdir))
  assert code == cli.EXIT_USAGE and len(lines) == 1 and expected in lines[0], lines
  assert os.listdir(tmp_path) == ['new'] and os.listdir(tmp_path / 'new') == []


def test_a_failed_start_restores_the_workdir_it_found(tmp_path):
  """It fails after the trainer wrote its first files (config.json, logs, checkpoints/)."""
  workdir = tmp_path / 'work'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  (workdir / 'config.json').write_text('{}')
  config = digits_run.config()
  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='No model at'):
    trainer.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir)) == ['config.json', 'notes.txt']
  assert (workdir / 'config.json').read_text() == '{}'


@pytest.fixture(name='training_file')
def _training_file(tmp_path):
  path = tmp_path / 'tiny-train.pth'
  torch.save(tc.tiny_torch_model().state_dict(), path)
  return path


def test_wrong_model_names_both_models_in_few_lines(training_file, tmp_path, capsys):
  assert convert.main(['import', str(training_file), str(tmp_path / 'a'), '--model', 'b224']) == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) <= 12, lines
  assert 'RepMLPNet-B224 (training form)' in lines[0]
  assert 'the file holds _RepMLPNet-Tiny (training form)' in lines[0]
  assert 'drop --model' in lines[0] and lines[-1].endswith('--verbose lists every key.')
  missing = next(line for line in lines if 'missing key(s)' in line)
  assert missing.endswith('more)') and missing.count(', ') <= 5

  assert convert.main(['import', str(training_file), str(tmp_path / 'a'), '--model', 'b224',
                       '--verbose']) == 2
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

  assert convert.main(['export', str(not_a_checkpoint), str(tmp_path / 'out.pth')]) == 2
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
  assert convert.main(['reparam', str(missing), str(tmp_path / 'deploy')]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == [f'convert.py reparam: error: No model at {missing}: give '
                 f'{model_io.WHAT_IS_READ}.']


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
  assert predict.main(['--checkpoint', model_dir, '--export', str(out / 'tiny.bin')]) == 1
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


def test_a_real_full_disk(model_dir, tmp_path):
  """A 64 KiB tmpfs, where the test may mount one (root on Linux); the tiny model needs more.

  convert.py as a user runs it: orbax's background threads log a traceback each as the save
  fails; the terminal shows only the command's line.
  """
  disk = tmp_path / 'disk'
  with helpers.tmpfs(disk, '64k'):
    done = subprocess.run([sys.executable, 'convert.py', 'reparam', model_dir,
                           str(disk / 'deploy')], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
                          timeout=300, capture_output=True, text=True, check=False)
    assert done.returncode == cli.EXIT_ERROR
    assert done.stderr.splitlines() == [
        f'convert.py reparam: error: Cannot write {disk}/deploy: no space left on device.']
    assert os.listdir(disk) == []


# configs/digits.py on two stages: its first checkpoint comes after seconds of compiling.
SMALL_DIGITS = """from configs import digits


def get_config():
  config = digits.get_config()
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))
  return config
"""


def test_a_real_full_disk_while_training_is_one_line(tmp_path):
  """train.py on a 3 MB tmpfs whose free space holds the run's first files, not a checkpoint.

  orbax's background threads log a traceback each when the save fails; the terminal shows only
  the command's line.
  """
  config_file = tmp_path / 'small_digits.py'
  config_file.write_text(SMALL_DIGITS)
  disk = tmp_path / 'disk'
  with helpers.tmpfs(disk, '3m'):
    (disk / 'ballast').write_bytes(bytes(3 * 2**20 - 100 * 2**10))
    done = subprocess.run(
        [sys.executable, 'train.py', '--config', str(config_file), '--workdir', str(disk / 'w'),
         '--config.num_train_steps=2', '--config.checkpoint_every_steps=1',
         '--config.global_batch_size=16', '--config.eval_every_epochs=1000.0'],
        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=900, capture_output=True,
        text=True, check=False)
    assert sorted(os.listdir(disk / 'w' / 'checkpoints')) == []  # Nothing partial left.
  assert done.returncode == cli.EXIT_ERROR, done.stderr[-3000:]
  assert done.stderr.splitlines() == [
      f'train.py: error: Cannot write {disk}/w/checkpoints/1: no space left on device; no '
      'checkpoint had been written yet; free space, then rerun the same command to resume.']
  assert 'Traceback' not in done.stdout and 'orbax' not in done.stdout


def test_a_finished_run_ends_with_one_line():
  run = digits_run.run()
  result, workdir = run.result, run.workdir
  assert run.stdout.splitlines()[-1] == (
      f'Finished at step {digits_run.TOTAL_STEPS}: eval top-1 {100 * result["top1"]:.2f}% '
      f'(training form), {100 * result["deploy_top1"]:.2f}% (deploy form); deploy model in '
      f'{workdir}/deploy, metrics in {workdir}/metrics.jsonl.')


def test_a_model_without_imagenet_classes_gets_one_plain_line(model_dir, tmp_path, capsys):
  image = tmp_path / 'x.png'
  Image.new('RGB', (40, 40)).save(image)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    assert predict.main(['--checkpoint', model_dir, str(image), '--top-k', '2']) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["predict.py: classes shown as indices: the model has 10 classes, "
                                "not ImageNet's 1000; --class-names FILE (one name a line) names "
                                'them.']
    assert out.splitlines()[1].endswith(')') and len(out.splitlines()) == 3
    # An error stays one line, whatever the classes.
    assert predict.main(['--checkpoint', model_dir, str(tmp_path / 'none.png')]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
  assert not [w for w in caught if issubclass(w.category, UserWarning)], caught
  names = tmp_path / 'names.txt'
  names.write_text(''.join(f'digit {i}\n' for i in range(10)) + '\n')
  assert predict.main(['--checkpoint', model_dir, str(image), '--class-names', str(names)]) == 0
  out, err = capsys.readouterr()
  assert err == '' and ' digit ' in out.splitlines()[1]
  names.write_text('zero\none\n')
  assert predict.main(['--checkpoint', model_dir, str(image), '--class-names', str(names)]) == 2
  assert capsys.readouterr().err.splitlines() == [
      'predict.py: error: 2 class names for a model with 10 classes.']


def test_exit_statuses_follow_the_one_table(model_dir, tmp_path, capsys):
  """README's table against cli's constants; a case of each status of convert.py and predict.py.

  train.py's: its argument errors above (2), tests/test_run_recovery.py (1 on a full disk, 2 for
  a workdir of another model or no readable checkpoint, 75 on a requested stop). A full disk
  gives 1 for convert.py and predict.py (test_a_full_disk_leaves_one_line_and_no_partial_file).
  """
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    table = f.read().split('**Exit statuses**', 1)[1].split('\n\n', 2)[1].splitlines()[2:]
  documented = {int(row.split('|')[1]): row.split('|')[2].strip() for row in table}
  assert documented == {cli.EXIT_OK: 'done', cli.EXIT_ERROR: 'a failure while working',
                        cli.EXIT_USAGE: 'a usage error',
                        cli.EXIT_STOPPED: 'stopped on request, after saving a checkpoint '
                                          '(train.py)'}
  image = tmp_path / 'x.png'
  Image.new('RGB', (40, 40)).save(image)
  taken = tmp_path / 'taken.pth'
  taken.write_bytes(b'')
  cases = [
      (convert.main, ['export', model_dir, str(tmp_path / 'tiny.pth')], cli.EXIT_OK),
      (convert.main, ['reparam', str(tmp_path / 'nowhere'), str(tmp_path / 'a')], cli.EXIT_USAGE),
      (convert.main, ['export', model_dir, str(taken)], cli.EXIT_USAGE),
      (convert.main, ['reparam', model_dir, str(tmp_path / 'b'), '--step', '3'], cli.EXIT_USAGE),
      (convert.main, ['reparam', str(image), str(tmp_path / 'c')], cli.EXIT_USAGE),
      (convert.main, ['import', str(tmp_path / 'tiny.pth'), str(tmp_path / 'd'), '--model',
                      'b224'], cli.EXIT_USAGE),
      (predict.main, ['--checkpoint', str(tmp_path / 'nowhere'), str(image)], cli.EXIT_USAGE),
      (predict.main, ['--checkpoint', model_dir, str(image), '--class-names',
                      str(tmp_path / 'none.txt')], cli.EXIT_USAGE),
      (predict.main, ['--checkpoint', model_dir, str(image), '--image-size', '33'],
       cli.EXIT_USAGE),
  ]
  for main, argv, expected in cases:
    assert main(argv) == expected, argv
    err = capsys.readouterr().err.splitlines()
    assert len(err) <= 12 and (expected == cli.EXIT_OK) == (not err), (argv, err)
  with pytest.raises(SystemExit) as info:  # argparse's own usage errors.
    predict.main(['--checkpoint'])
  assert info.value.code == cli.EXIT_USAGE
