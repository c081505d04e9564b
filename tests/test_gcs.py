"""gs:// workdirs and files, against a Cloud Storage emulator on 127.0.0.1 (tests/gcs_emulator.py).

Everything that talks to the bucket runs as a process beside the emulator, in a network namespace
with only a loopback device where one can be made, with the environment that points gcsfs and
TensorStore at the emulator and keeps Google's authentication off the network. The test reads
the results back from the emulator's own files on disk (a checkpoint written to the bucket is a
complete orbax directory there).

Few processes, since each train.py start compiles (they share one compilation cache):
- a digits run on the bucket, stopped by SIGTERM, resumed to the end and compared bit for bit with
  an uninterrupted local run; then its last checkpoint damaged in the bucket and the run started
  again: the damaged step is set aside and the same end state is reached again;
- two processes (`--multihost` on localhost) saving to and resuming from the bucket;
- convert.py, predict.py and the readers (from_pretrained, load_model, load_torch, jax.export)
  with gs:// inputs and outputs, in one process.
Not covered here: TensorBoard event files and tfds data sets on gs:// (TensorFlow's GCS client
cannot be pointed at an emulator).
"""

import json
import os
import signal
import socket
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip('gcsfs', reason="needs the gcs extra: pip install 'repmlp-jax[gcs]'")
pytest.importorskip('gcp_storage_emulator',
                    reason="needs the storage emulator of the test extra: "
                    "pip install 'repmlp-jax[test]'")

from repmlp_jax import model_io  # noqa: E402  pylint: disable=g-import-not-at-top
from repmlp_jax.train import trainer  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import gcs_emulator
from tests import test_train_loop as tl
from tests import test_train_process as tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', name='emulator')
def _emulator(tmp_path_factory):
  with gcs_emulator.Emulator(tmp_path_factory.mktemp('gcs')) as emulator:
    yield emulator


def _gcsfs(emulator, code: str) -> str:
  """Runs `code` with `fs`, a gcsfs file system on the emulator (as an operator's tool would)."""
  code, out = emulator.run([sys.executable, '-c', 'import fsspec\n'
                            "fs = fsspec.filesystem('gs')\n" + code], timeout=120)
  assert code == 0, out[-3000:]
  return out


def _train_py(emulator, workdir, config_file, cache, *extra):
  flags = [*tp.FLAGS, '--config.tensorboard=False', f'--config.compilation_cache_dir={cache}']
  return emulator.popen([sys.executable, 'train.py', '--config', str(config_file), '--workdir',
                         workdir, *flags, *extra])


def _steps(emulator, checkpoints: str) -> list[int]:
  """The complete checkpoints in the bucket (the emulator keeps emptied folders on disk)."""
  folder = emulator.stored(checkpoints)
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit()
                and os.path.exists(os.path.join(folder, s, 'commit_success.txt')))


def _read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _final_state(workdir):
  exp = trainer.build_experiment(tp._config())  # pylint: disable=protected-access
  return tl.restore_final_state(exp, workdir, tp.STEPS)


@pytest.fixture(scope='module', name='bucket_run')
def _bucket_run(emulator, tmp_path_factory):
  """The digits run on gs://bucket/run: stopped, resumed, then restarted on a damaged checkpoint.

  Returns:
    A dict of what each start printed and left in the bucket, and the local reference run.
  """
  tmp = tmp_path_factory.mktemp('bucket_run')
  config_file, cache = tmp / 'small_digits.py', tmp / 'jax_cache'
  config_file.write_text(tp.SMALL_CONFIG)
  workdir, reference = emulator.url('run'), str(tmp / 'reference')
  stopped = _train_py(emulator, workdir, config_file, cache)
  uninterrupted = _train_py(emulator, reference, config_file, cache)
  metrics = emulator.stored('run/metrics.jsonl')
  deadline = time.time() + 900
  while not os.path.exists(metrics) or 'train/loss' not in open(metrics, encoding='utf-8').read():
    assert stopped.poll() is None, stopped.communicate()[0][-3000:]
    assert time.time() < deadline, 'train.py logged no step in 15 minutes'
    time.sleep(0.05)
  os.kill(stopped.pid, signal.SIGTERM)
  run = {'stop': stopped.communicate(timeout=600)[0], 'stop_code': stopped.returncode,
         'stop_steps': _steps(emulator, 'run/checkpoints'),
         'deploy_after_stop': os.path.exists(emulator.stored('run/deploy/commit_success.txt'))}
  assert len(run['stop_steps']) == 1, run['stop'][-3000:]
  kept = run['stop_steps'][0]
  _gcsfs(emulator, f"fs.copy('bucket/run/checkpoints/{kept}', 'bucket/kept/{kept}', "
                   'recursive=True)')

  resumed = _train_py(emulator, workdir, config_file, cache)
  for name, process in (('resume', resumed), ('reference', uninterrupted)):
    run[name] = process.communicate(timeout=900)[0]
    assert process.returncode == 0, run[name][-3000:]
  run['resumed_state'] = _final_state(emulator.stored('run'))
  run['resumed_deploy'] = model_io.load_model(emulator.stored('run/deploy'))
  run['resumed_metrics'] = _read_jsonl(metrics)
  run['reference'] = reference

  # The step of the stop back beside the last one; the last one truncated, as a bad copy would.
  _gcsfs(emulator, f"""
fs.copy('bucket/kept/{kept}', 'bucket/run/checkpoints/{kept}', recursive=True)
fs.rm('bucket/run/deploy', recursive=True)
for name in fs.find('bucket/run/checkpoints/{tp.STEPS}'):
  if '/d/' in name:
    fs.pipe(name, fs.cat(name)[:fs.size(name) // 2])
""")
  restarted = _train_py(emulator, workdir, config_file, cache)
  run['restart'] = restarted.communicate(timeout=900)[0]
  run['restart_code'] = restarted.returncode
  run['kept'] = kept
  return run


def test_sigterm_saves_a_checkpoint_in_the_bucket(bucket_run):
  assert 1 <= bucket_run['kept'] < tp.STEPS
  assert not bucket_run['deploy_after_stop']
  assert (f'Stopped at step {bucket_run["kept"]} on request; checkpoint saved in '
          'gs://bucket/run/checkpoints. Rerun the same command to resume.') in bucket_run['stop']


def test_resume_from_the_bucket_is_exact(bucket_run):
  assert f'Resumed from gs://bucket/run/checkpoints at step {bucket_run["kept"]}.' in \
      bucket_run['resume']
  want = _final_state(bucket_run['reference'])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(bucket_run['resumed_state'])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  model, variables = model_io.load_model(os.path.join(bucket_run['reference'], 'deploy'))
  assert bucket_run['resumed_deploy'][0] == model
  jax.tree.map(np.testing.assert_array_equal, bucket_run['resumed_deploy'][1], variables)
  # metrics.jsonl, uploaded whole at each write: every line of both starts, the same evaluation.
  records = bucket_run['resumed_metrics']
  reference = tl.read_jsonl(bucket_run['reference'])
  assert [r for r in records if 'eval/top1' in r] == [r for r in reference if 'eval/top1' in r]
  assert sorted({r['step'] for r in records if 'train/loss' in r}) == list(range(1, tp.STEPS + 1))


def test_a_damaged_checkpoint_in_the_bucket_is_set_aside(bucket_run, emulator):
  out = bucket_run['restart']
  assert bucket_run['restart_code'] == 0, out[-3000:]
  assert [line for line in out.splitlines() if 'cannot be read' in line] == [
      f'Warning: checkpoint step {tp.STEPS} cannot be read (moved to '
      f'gs://bucket/run/damaged_checkpoints); resuming from step {bucket_run["kept"]}.']
  assert os.path.exists(emulator.stored(f'run/damaged_checkpoints/{tp.STEPS}/commit_success.txt'))
  # Trained again from the kept step: the same end state, deploy model and evaluation.
  state = _final_state(emulator.stored('run'))
  jax.tree.map(np.testing.assert_array_equal, state, bucket_run['resumed_state'])
  model, variables = model_io.load_model(emulator.stored('run/deploy'))
  assert model == bucket_run['resumed_deploy'][0]
  jax.tree.map(np.testing.assert_array_equal, variables, bucket_run['resumed_deploy'][1])
  evals = [r for r in _read_jsonl(emulator.stored('run/metrics.jsonl')) if 'eval/top1' in r]
  assert evals[-1] == [r for r in bucket_run['resumed_metrics'] if 'eval/top1' in r][-1]


def test_two_processes_save_to_and_resume_from_the_bucket(emulator, tmp_path):
  config_file = tmp_path / 'small_digits.py'
  config_file.write_text(tp.SMALL_CONFIG)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]

  def start(steps):
    env = {'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
    processes = [emulator.popen(
        [sys.executable, 'train.py', '--config', str(config_file), '--workdir',
         emulator.url('multi'), *tp.FLAGS, f'--config.num_train_steps={steps}',
         '--config.checkpoint_every_steps=2', '--config.tensorboard=False',
         f'--config.compilation_cache_dir={tmp_path / "cache"}', '--multihost',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        env=env) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outs):
      assert p.returncode == 0, out[-3000:]
    return outs

  start(4)
  assert _steps(emulator, 'multi/checkpoints') == [4]
  assert os.path.exists(emulator.stored('multi/deploy/commit_success.txt'))
  outs = start(6)  # Longer: both processes resume from the bucket's checkpoint.
  assert 'Resumed from gs://bucket/multi/checkpoints at step 4.' in outs[0]
  assert 'Resumed' not in outs[1]  # Only process 0 prints.
  assert _steps(emulator, 'multi/checkpoints') == [6]
  steps = [r['step'] for r in _read_jsonl(emulator.stored('multi/metrics.jsonl'))
           if 'train/loss' in r]
  assert steps == list(range(1, 7))  # Written by process 0 alone, each step once.


def test_convert_and_predict_with_bucket_paths(emulator, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import repmlp_jax  # pylint: disable=g-import-not-at-top
  from repmlp_jax.pytorch import exporter  # pylint: disable=g-import-not-at-top
  from tests import fast_init  # pylint: disable=g-import-not-at-top
  model = repmlp_jax.create_model('_RepMLPNet-Tiny', num_classes=10)
  variables = fast_init.random_variables(model, (1, 32, 32, 3), seed=3)
  pth = exporter.save_torch(tmp_path / 'tiny.pth', model, variables)
  image = tmp_path / 'image.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)).save(image)
  code, out = emulator.run([sys.executable, '-m', 'tests.gcs_convert_worker', pth, str(image),
                            emulator.url('convert')], timeout=900)
  assert code == 0, out[-3000:]
  seen = json.loads(out.splitlines()[-1])
  for step in ('import', 'export', 'export_hub', 'onnx', 'predict'):
    assert seen[step]['code'] == 0, (step, seen[step])
  assert seen['export_again']['code'] != 0 and seen['export_again']['err'] == [
      'convert.py export: error: gs://bucket/convert/out/back.pth already exists; choose '
      'another output path.']
  assert 'wrote deploy form' not in ' '.join(seen['import']['out'])
  assert any('gs://bucket/convert/a/b/ckpt' in line for line in seen['import']['out'])
  assert seen['predict']['out'][0] == str(image)
  assert seen['predict']['out'][-1].startswith('Wrote gs://bucket/convert/out/model.bin ')
  assert any('max relative difference' in line for line in seen['onnx']['out'])
  # What came back from the bucket is what was put in.
  want = exporter.to_torch_state_dict(model, variables)
  assert seen['exported_sum'] == {k: float(np.sum(v.numpy(), dtype=np.float64))
                                  for k, v in want.items()}
  assert seen['hub_equals_ckpt']
  np.testing.assert_allclose(seen['artifact_logits'], seen['model_logits'], rtol=1e-5,
                             atol=1e-5)
  assert 'already exists' in seen['overwrote'] and 'already exists' in seen['hub_overwrote']
  assert seen['missing'] == 'No pretrained directory at gs://bucket/convert/nowhere.'
  assert seen['listing'] == ['back.pth', 'hub', 'model.bin', 'model.onnx']
  # A workdir in a bucket that does not exist: one line, and no bucket created on the way.
  assert seen['no_bucket'].startswith('Cannot write to the workdir gs://no-such-bucket/run (')
  assert '\n' not in seen['no_bucket'] and seen['buckets'] == ['bucket']
