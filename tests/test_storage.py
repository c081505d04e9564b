"""The path layer without a bucket: what a gs:// path says when gcsfs is missing or the
credentials are wrong, and outputs that make their missing parent folders (never overwriting).
The gs:// reads and writes themselves are tested against an emulator in tests/test_gcs.py.
"""

import contextlib
import errno
import io
import os
import shutil
import sys
import threading
from unittest import mock

import pytest

pytest.importorskip('gcsfs', reason="needs the gcs extra: pip install 'repmlp-jax[gcs]'")
from gcsfs import retry as gcsfs_retry  # noqa: E402
from google.auth import exceptions as auth_exceptions  # noqa: E402

import repmlp_jax  # noqa: E402  pylint: disable=g-import-not-at-top
from repmlp_jax import model_io
from repmlp_jax import outputs
from repmlp_jax import storage
from tests import fast_init

EXTRA = "pip install -e '.[gcs]'"


def test_gs_without_gcsfs_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # As if not installed.
  with pytest.raises(ImportError) as raised:
    storage.resolve('gs://bucket/run')
  assert str(raised.value) == ('gs://bucket/run is in Google Cloud Storage, which needs gcsfs: '
                               f'{EXTRA}.')
  from tests import test_run_recovery  # pylint: disable=g-import-not-at-top
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert test_run_recovery.run_train_py('gs://bucket/run') == 2  # A missing extra: usage.
  assert err.getvalue().splitlines() == [f'train.py: error: {raised.value}']


def test_other_schemes_are_refused():
  with pytest.raises(ValueError, match='only local paths and gs:// URLs'):
    storage.resolve('s3://bucket/run')


@pytest.mark.parametrize('error, says', [
    (auth_exceptions.DefaultCredentialsError('Your default credentials were not found.\nMore.'),
     'no usable Google Cloud credentials (Your default credentials were not found.)'),
    (auth_exceptions.RefreshError('invalid_grant: Token has been expired or revoked.'),
     'no usable Google Cloud credentials (invalid_grant'),
    (gcsfs_retry.HttpError({'code': 401, 'message': 'Invalid Credentials'}), 'not authenticated'),
    (OSError('Forbidden: https://storage.googleapis.com/b/bucket/o\nuser lacks access'),
     'permission denied'),
])
def test_credential_errors_are_one_line(error, says):
  with pytest.raises(storage.StorageError) as raised:
    with storage.reaching('gs://bucket/run'):
      raise error
  message = str(raised.value)
  assert message.startswith(f'Cannot access gs://bucket/run: {says}') and '\n' not in message
  assert 'gcloud auth application-default login' in message
  with pytest.raises(type(error)):  # Other errors, and local paths, pass unchanged.
    with storage.reaching('/tmp/run'):
      raise error


def test_outputs_make_missing_parents_and_never_overwrite(tmp_path):
  model = repmlp_jax.create_model('_RepMLPNet-Tiny', num_classes=10)
  variables = fast_init.random_variables(model, (1, 32, 32, 3), seed=0)
  file = outputs.write_new_file(tmp_path / 'a' / 'b' / 'file.bin', lambda f: f.write(b'1'))
  assert open(file, 'rb').read() == b'1'
  hub_dir = repmlp_jax.save_pretrained(tmp_path / 'c' / 'hub', model, variables)
  assert sorted(p.name for p in (tmp_path / 'c').iterdir()) == ['hub']  # No temporary left.
  orbax_dir = model_io.save_model(tmp_path / 'd' / 'e' / 'ckpt', model, variables)
  assert model_io.load_model(orbax_dir)[0] == model
  for path, write in ((file, lambda: outputs.write_new_file(file, lambda f: f.write(b'2'))),
                      (hub_dir, lambda: repmlp_jax.save_pretrained(hub_dir, model, variables))):
    with pytest.raises(FileExistsError, match=f'{path} already exists'):
      write()
  assert open(file, 'rb').read() == b'1'
  with pytest.raises(NotADirectoryError, match='is a file'):
    outputs.check_new_output(tmp_path / 'a' / 'b' / 'file.bin' / 'inside')


def test_a_failed_write_is_cleaned_up_while_its_writer_thread_still_adds_files(tmp_path):
  """orbax saves in threads: when one item fails, another may still be writing into the
  temporary folder while it is removed ('Directory not empty'); the cleanup scans again and the
  write's own error is what the caller sees."""
  real_rmtree, calls = shutil.rmtree, []

  def rmtree_racing_a_writer(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 1:  # The writer thread adds a file just as the first removal runs.
      raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(path))
    return real_rmtree(path, *args, **kwargs)

  target = tmp_path / 'deploy'
  with mock.patch.object(shutil, 'rmtree', rmtree_racing_a_writer):
    with pytest.raises(outputs.WriteError, match='no space left on device'):
      with outputs.writing(target):
        (tmp_path / 'deploy.orbax-checkpoint-tmp' / 'params').mkdir(parents=True)
        writer = threading.Thread(target=(tmp_path / 'deploy.orbax-checkpoint-tmp' / 'x').touch)
        writer.start()
        writer.join()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert len(calls) >= 2 and os.listdir(tmp_path) == []


def test_a_writer_that_never_stops_adding_files_is_warned_of(tmp_path):
  """The cleanup gives up after 40 scans (2 s) and says so rather than leaving files silently."""
  target, scans = tmp_path / 'deploy', []

  def entries(directory):  # A writer that adds a file before every scan, each one removed.
    scans.append(directory)
    return {f'left_{len(scans) - 1}'}

  with mock.patch.object(outputs, '_entries', entries), \
       mock.patch.object(outputs.time, 'sleep', lambda seconds: None):
    with pytest.warns(RuntimeWarning, match=r'kept creating .* \(the last scan removed left_40\)'):
      with pytest.raises(outputs.WriteError, match='no space left on device'):
        with outputs.writing(target):
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
