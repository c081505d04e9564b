"""Reading PyTorch checkpoint files safely: layouts, wrappers, and files that must be refused."""

import builtins
import collections
import os

import numpy as np
import pytest
import torch

from repmlp_jax.pytorch import files as torch_files
from tests import torch_checkpoints as tc
from tests import torch_reference as tr

SD = collections.OrderedDict([('conv.weight', torch.randn(4, 3, 2, 2)),
                              ('bn.running_var', torch.rand(4) + 0.5),
                              ('bn.num_batches_tracked', torch.tensor(7))])


def _save(obj, path, zip_format=True):
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  return path


def _assert_same(arrays, sd=SD):
  assert list(arrays) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(arrays[k], v.numpy())
    assert arrays[k].dtype == v.numpy().dtype


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_raw_state_dict(tmp_path, zip_format):
  read = torch_files.read_torch_checkpoint(_save(SD, tmp_path / 'a.pth', zip_format))
  _assert_same(read.state_dict)
  assert read.format == ('zip' if zip_format else 'legacy')
  assert read.entry == 'top level' and read.stripped_prefix == ''


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_training_checkpoint_with_yacs_config_runs_no_code(tmp_path, monkeypatch, zip_format):
  marker = tmp_path / 'config_code_ran'
  yacs = tc.FakeYacs(monkeypatch, marker)
  path = _save(tc.training_checkpoint(SD, yacs.config()), tmp_path / 'train.pth', zip_format)
  # The payload is live: ordinary unpickling runs the config class's code.
  torch.load(path, weights_only=False)
  assert marker.exists()
  marker.unlink()

  read = torch_files.read_torch_checkpoint(path)
  assert not marker.exists()
  _assert_same(read.state_dict)
  assert read.entry == "'model'"
  assert set(read.other_entries) == {'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch',
                                     'config'}
  # The config was kept as inert data: its items and attribute state, tagged with its class.
  obj, _ = torch_files.load_file(path)
  config = obj['config']
  assert type(config) is collections.OrderedDict
  assert config['MODEL']['ARCH'] == 'RepMLPNet-B224'
  assert config.__dict__['pickled_class'] == 'yacs.config.CfgNode'
  assert config.__dict__['__immutable__'] is False


def test_module_prefix_is_removed(tmp_path):
  prefixed = collections.OrderedDict(('module.' + k, v) for k, v in SD.items())
  read = torch_files.read_torch_checkpoint(_save({'model': prefixed}, tmp_path / 'ddp.pth'))
  _assert_same(read.state_dict)
  assert read.stripped_prefix == 'module.'


def test_ema_weights_only_when_asked(tmp_path):
  ema = collections.OrderedDict((k, v + 1) for k, v in SD.items())
  path = _save({'model': SD, 'model_ema': ema, 'epoch': 3}, tmp_path / 'ema.pth')
  plain = torch_files.read_torch_checkpoint(path)
  _assert_same(plain.state_dict)
  assert plain.ema_available == ('model_ema',) and 'not used' in plain.describe()
  averaged = torch_files.read_torch_checkpoint(path, use_ema=True)
  _assert_same(averaged.state_dict, ema)
  assert averaged.entry == "'model_ema'"
  with pytest.raises(torch_files.CheckpointFileError, match='no EMA weights'):
    torch_files.read_torch_checkpoint(_save({'model': SD}, tmp_path / 'no_ema.pth'), use_ema=True)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_mmpretrain_file(tmp_path, zip_format):
  sd = tr.to_mmpretrain_state_dict(tc.tiny_torch_model().state_dict())
  obj = {'meta': {'mmcls_version': '0.23.0', 'CLASSES': ['a', 'b']}, 'state_dict': sd}
  read = torch_files.read_torch_checkpoint(_save(obj, tmp_path / 'mm.pth', zip_format))
  _assert_same(read.state_dict, sd)
  assert read.entry == "'state_dict'" and read.other_entries == ('meta',)


def test_numpy_metadata_is_read(tmp_path):
  meta = {'max_accuracy': np.float64(80.32), 'history': np.arange(4.0), 'dtype': np.dtype('f4')}
  path = _save({'model': SD, 'meta': meta}, tmp_path / 'np.pth')
  obj, _ = torch_files.load_file(path)
  assert obj['meta']['max_accuracy'] == meta['max_accuracy']
  np.testing.assert_array_equal(obj['meta']['history'], meta['history'])
  assert obj['meta']['dtype'] == np.float32
  _assert_same(torch_files.read_torch_checkpoint(path).state_dict)


def test_bfloat16_becomes_float32(tmp_path):
  sd = {'w': torch.randn(3, 2).to(torch.bfloat16)}
  read = torch_files.read_torch_checkpoint(_save(sd, tmp_path / 'bf16.pth'))
  assert read.state_dict['w'].dtype == np.float32
  np.testing.assert_array_equal(read.state_dict['w'], sd['w'].float().numpy())


class _CallsOsSystem:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


class _CallsExec:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return builtins.exec, (f'open({str(self.marker)!r}, "w").close()',)


class _CallsOpen:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return builtins.open, (str(self.marker), 'w')


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
@pytest.mark.parametrize('payload', [_CallsOsSystem, _CallsExec, _CallsOpen])
def test_pickle_that_would_run_code_is_refused(tmp_path, zip_format, payload):
  marker = tmp_path / 'code_ran'
  path = _save({'model': SD, 'extra': payload(marker)}, tmp_path / 'evil.pth', zip_format)
  with pytest.raises(torch_files.UnsafeCheckpointError, match='refused'):
    torch_files.read_torch_checkpoint(path)
  assert not marker.exists()


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
@pytest.mark.parametrize('keep', [0.5, 0.98])
def test_truncated_file(tmp_path, zip_format, keep):
  data = _save({'model': SD}, tmp_path / 'full.pth', zip_format).read_bytes()
  path = tmp_path / 'cut.pth'
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(torch_files.CheckpointFileError, match='truncated or corrupt'):
    torch_files.read_torch_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('not weights')
  with pytest.raises(torch_files.CheckpointFileError, match='not a PyTorch checkpoint'):
    torch_files.read_torch_checkpoint(text)
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  with pytest.raises(torch_files.CheckpointFileError, match='empty'):
    torch_files.read_torch_checkpoint(empty)
  with pytest.raises(FileNotFoundError):
    torch_files.read_torch_checkpoint(tmp_path / 'missing.pth')
  with pytest.raises(torch_files.CheckpointFileError, match='No state_dict found'):
    torch_files.read_torch_checkpoint(_save({'epoch': 3}, tmp_path / 'nothing.pth'))
  with pytest.raises(torch_files.CheckpointFileError, match='not a state_dict'):
    torch_files.read_torch_checkpoint(_save([1, 2], tmp_path / 'list.pth'))
