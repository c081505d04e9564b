"""The hub layout: save_pretrained -> from_pretrained (a directory, a repo id from the hub cache
offline), the authors' state_dicts saved as .safetensors, convert.py's safetensors routes, and
bad inputs that give one clear error and write nothing."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip('safetensors', reason="needs the hub extra: pip install 'repmlp-jax[hub]'")
from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

import repmlp_jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from repmlp_jax import hub  # pylint: disable=g-import-not-at-top
from tests import fast_init  # pylint: disable=g-import-not-at-top

TINY = '_RepMLPNet-Tiny'  # 32 x 32 inputs.
V1 = 'RepMLP-CIFAR-PureMLP'  # The paper's pure-MLP CIFAR model (v1 RepMLP blocks), 32 x 32.
_JITTED = {}


def _logits(model, variables, x):
  key = repr(model)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(_JITTED[key](variables, x))


def _model(name, deploy=False, num_classes=10):
  model = repmlp_jax.create_model(name, num_classes=num_classes)
  variables = fast_init.random_variables(model, (1, 32, 32, 3), seed=1)
  if deploy:
    model, variables = repmlp_jax.reparam(model, variables)
  return model, variables


def _images(n=2):
  return jax.random.normal(jax.random.key(0), (n, 32, 32, 3))


def _listing(directory):
  return sorted(os.listdir(directory))


@pytest.mark.parametrize('name', [TINY, V1])
@pytest.mark.parametrize('deploy', [False, True], ids=['training', 'deploy'])
def test_round_trip_gives_identical_logits(tmp_path, name, deploy):
  model, variables = _model(name, deploy)
  path = repmlp_jax.save_pretrained(tmp_path / 'pretrained', model, variables)
  assert _listing(path) == ['config.json', 'model.safetensors']
  assert _listing(tmp_path) == ['pretrained']  # No temporary directory left behind.

  loaded_model, loaded = repmlp_jax.from_pretrained(path)
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(variables))
  x = _images()
  np.testing.assert_array_equal(_logits(loaded_model, loaded, x), _logits(model, variables, x))

  config = json.loads((tmp_path / 'pretrained' / 'config.json').read_text())
  assert config['architecture'] == name
  assert config['form'] == ('deploy' if deploy else 'training')
  assert config['num_classes'] == 10
  assert config['preprocessing'] == {'image_size': 32, 'crop_ratio': 1.0,
                                     'interpolation': 'bilinear',
                                     'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
  arrays = safetensors_numpy.load_file(os.path.join(path, 'model.safetensors'))
  assert all(a.dtype == np.float32 for a in arrays.values())
  assert len(arrays) == len(jax.tree.leaves(variables))


def test_flat_names_are_readable():
  model, variables = _model(TINY)
  names = set(hub.flat_variables(variables))
  assert 'params.conv_embedding.conv.kernel' in names
  assert 'batch_stats.conv_embedding.bn.mean' in names


def _hub_cache(tmp_path, pretrained, repo_id='repmlp/repmlpnet-tiny', revision='a' * 40):
  """Lays out `pretrained`'s files as huggingface_hub caches a downloaded repository."""
  cache = tmp_path / 'hub_cache'
  repo = cache / ('models--' + repo_id.replace('/', '--'))
  snapshot = repo / 'snapshots' / revision
  snapshot.mkdir(parents=True)
  blobs = repo / 'blobs'
  blobs.mkdir()
  for name in ('config.json', 'model.safetensors'):
    blob = blobs / f'{name}-blob'  # The hub names blobs by their hash; any name resolves.
    blob.write_bytes((pretrained / name).read_bytes())
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(revision)
  return cache


@pytest.fixture(name='offline_hub')
def _offline_hub(tmp_path, monkeypatch):
  """HF_HUB_CACHE pointing to a test directory, offline mode on (no request leaves the test)."""
  pytest.importorskip('huggingface_hub',
                      reason="needs the hub extra: pip install 'repmlp-jax[hub]'")
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  model, variables = _model(TINY, deploy=True)
  pretrained = tmp_path / 'pretrained'
  repmlp_jax.save_pretrained(pretrained, model, variables)
  cache = _hub_cache(tmp_path, pretrained)
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  # huggingface_hub reads these variables when imported; this process imported it already.
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return model, variables, cache


def test_repo_id_resolved_offline_from_the_hub_cache(offline_hub):
  model, variables, cache = offline_hub
  loaded_model, loaded = repmlp_jax.from_pretrained('repmlp/repmlpnet-tiny')
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(variables))
  # A repository absent from the cache is an error saying so, not a download attempt.
  before = _listing(cache)
  with pytest.raises(FileNotFoundError, match='not in the hub cache.*offline'):
    repmlp_jax.from_pretrained('repmlp/not-cached')
  assert _listing(cache) == before
  # A local path that does not exist is never taken for a repo id.
  with pytest.raises(FileNotFoundError, match='No pretrained directory'):
    repmlp_jax.from_pretrained('./repmlp/repmlpnet-tiny')


def test_save_refuses_to_overwrite_and_checks_the_variables(tmp_path):
  model, variables = _model(TINY)
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='already exists'):
    repmlp_jax.save_pretrained(taken, model, variables)
  assert _listing(taken) == ['keep.txt']
  deploy_model, _ = _model(TINY, deploy=True)
  with pytest.raises(hub.PretrainedError, match='missing'):
    repmlp_jax.save_pretrained(tmp_path / 'wrong', deploy_model, variables)
  with pytest.raises(ValueError, match='crop_ratio'):
    repmlp_jax.save_pretrained(tmp_path / 'bad_crop', model, variables, crop_ratio=1.5)
  assert _listing(tmp_path) == ['taken']


@pytest.fixture(name='pretrained')
def _pretrained(tmp_path):
  model, variables = _model(TINY)
  return repmlp_jax.save_pretrained(tmp_path / 'pretrained', model, variables)


def _copy(src, dst, config=None, weights=None):
  os.mkdir(dst)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config if config is not None else json.load(
        open(os.path.join(src, 'config.json'))), f)
  data = weights if weights is not None else open(os.path.join(src, 'model.safetensors'),
                                                  'rb').read()
  with open(os.path.join(dst, 'model.safetensors'), 'wb') as f:
    f.write(data)
  return dst


def test_bad_pretrained_directories(tmp_path, pretrained):
  weights = open(os.path.join(pretrained, 'model.safetensors'), 'rb').read()
  config = json.load(open(os.path.join(pretrained, 'config.json')))

  cut = _copy(pretrained, tmp_path / 'cut', weights=weights[:len(weights) // 2])
  with pytest.raises(hub.PretrainedError, match='truncated'):
    repmlp_jax.from_pretrained(cut)

  unknown = _copy(pretrained, tmp_path / 'unknown',
                  config={**config, 'model': {**config['model'], 'class': 'RepMLPNetV9'}})
  with pytest.raises(hub.PretrainedError, match="Unknown model class 'RepMLPNetV9'"):
    repmlp_jax.from_pretrained(unknown)

  arrays = safetensors_numpy.load(weights)
  del arrays['params.head.kernel']
  missing = _copy(pretrained, tmp_path / 'missing', weights=safetensors_numpy.save(arrays))
  with pytest.raises(hub.PretrainedError, match='1 missing key.s.: params.head.kernel'):
    repmlp_jax.from_pretrained(missing)

  settings = {**config['model']['settings'], 'num_classes': 7}
  other = _copy(pretrained, tmp_path / 'other', config={
      **config, 'num_classes': 7, 'model': {**config['model'], 'settings': settings}})
  with pytest.raises(hub.PretrainedError, match=r'params.head.kernel: expected shape \(32, 7\)'):
    repmlp_jax.from_pretrained(other)

  contradiction = _copy(pretrained, tmp_path / 'contradiction', config={**config, 'form': 'deploy'})
  with pytest.raises(hub.PretrainedError, match='contradicts itself'):
    repmlp_jax.from_pretrained(contradiction)

  foreign = _copy(pretrained, tmp_path / 'foreign', config={'architecture': 'resnet50'})
  with pytest.raises(hub.PretrainedError, match='another library'):
    repmlp_jax.from_pretrained(foreign)

  os.remove(os.path.join(missing, 'model.safetensors'))
  with pytest.raises(FileNotFoundError, match='lacks model.safetensors'):
    repmlp_jax.from_pretrained(missing)
