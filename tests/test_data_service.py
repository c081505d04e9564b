"""The tf.data service on localhost: a dispatcher and two workers in subprocesses serve the
training pipeline; an epoch holds the same examples as the local pipeline's, and train.py's
loop runs on it."""

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from repmlp_jax.data import input_pipeline
from repmlp_jax.data import preprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAST = preprocess.Preprocess(randaugment_layers=0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 300.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'service process exited: {process.stdout.read()}')
    with contextlib.suppress(OSError), socket.create_connection(('localhost', port), 0.2):
      return
    time.sleep(0.2)
  raise TimeoutError(f'nothing listens on port {port} after {timeout} s')


@pytest.fixture(scope='module')
def service():
  """grpc address of a dispatcher with two workers, all on loopback."""
  env = dict(os.environ, PYTHONPATH=_ROOT, CUDA_VISIBLE_DEVICES='')
  command = [sys.executable, '-m', 'repmlp_jax.data.service']
  dispatcher_port, worker_ports = _free_port(), [_free_port(), _free_port()]
  roles = [['dispatcher', '--port', str(dispatcher_port)]] + [
      ['worker', '--dispatcher', f'localhost:{dispatcher_port}', '--port', str(port),
       '--worker_address', 'localhost:%port%'] for port in worker_ports]
  processes = []
  try:
    # All at once: importing TensorFlow is most of their start-up; workers retry the dispatcher.
    for role in roles:
      processes.append(subprocess.Popen(command + role, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    for port, process in zip([dispatcher_port] + worker_ports, processes):
      _wait_for_port(port, process)
    yield f'grpc://localhost:{dispatcher_port}'
  finally:
    for process in reversed(processes):
      process.terminate()
    for process in processes:
      process.wait(timeout=30)


@pytest.fixture(scope='module')
def one_image_per_class(tmp_path_factory):
  """An image folder where the label names the example: 12 train images, 12 classes."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for i in range(12):
    for split in ('train', 'val'):
      (root / split / f'c{i:02d}').mkdir(parents=True)
    pixels = rng.integers(0, 256, (30 + i, 40 - i, 3), np.uint8)
    Image.fromarray(pixels).save(root / 'train' / f'c{i:02d}' / 'a.jpg')
    Image.fromarray(pixels).save(root / 'val' / f'c{i:02d}' / 'a.jpg')
  return str(root)


def _epoch_labels(batches, steps):
  return [sorted(np.concatenate([b['label'] for b in epoch]).tolist())
          for epoch in (list(itertools.islice(batches, steps)),)][0]


@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 2)])
def test_service_epoch_holds_the_local_epochs_examples(service, one_image_per_class,
                                                       process_index, process_count):
  args = dict(train=True, batch_size=3, image_size=16, data_dir=one_image_per_class,
              preprocess=_FAST, process_index=process_index, process_count=process_count)
  steps = 12 // process_count // 3
  local = input_pipeline.create_split('image_folder', **args)
  served = input_pipeline.create_split('image_folder', data_service_address=service, **args)
  for _ in range(2):  # Two epochs: each is this process's share, every example once.
    expected = _epoch_labels(local, steps)
    got_batches = list(itertools.islice(served, steps))
    for batch in got_batches:
      assert batch['image'].shape == (3, 16, 16, 3) and batch['image'].dtype == np.float32
    assert sorted(np.concatenate([b['label'] for b in got_batches]).tolist()) == expected
    assert len(set(expected)) == 12 // process_count


def test_service_resume_keeps_epoch_boundaries(service, one_image_per_class):
  # 12 examples, 4 steps of 3 per epoch. Resumed at step 3, the stream ends the first epoch
  # after one batch, then serves the second epoch whole: each example once in its 4 batches.
  resumed = input_pipeline.create_split(
      'image_folder', train=True, batch_size=3, image_size=16, data_dir=one_image_per_class,
      preprocess=_FAST, start_step=3, data_service_address=service)
  batches = list(itertools.islice(resumed, 1 + 4))
  assert sorted(np.concatenate([b['label'] for b in batches[1:]]).tolist()) == list(range(12))


def test_train_loop_runs_on_the_service(service, tmp_path):
  from configs import digits
  from repmlp_jax.train import trainer
  config = digits.get_config()
  # Two stages of the tiny variant: the model compiles in a fraction of the digits model's time.
  config.model_overrides.update(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                sharesets=(2, 4))
  config.num_train_steps = 3
  config.eval_every_epochs = 100.0
  config.checkpoint_every_steps = 3
  config.log_every_steps = 1
  config.data_service_address = service
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 3 and result['count'] == 359 and np.isfinite(result['loss'])


def test_service_is_for_training_only():
  with pytest.raises(ValueError, match='evaluation runs locally'):
    input_pipeline.create_split('digits', train=False, batch_size=8, image_size=8,
                                data_service_address='grpc://localhost:1')
