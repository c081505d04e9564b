"""Weights in the Hugging Face hub layout: `model.safetensors` + `config.json` in one directory.

`save_pretrained` writes the directory people share (timm and the hub load `model.safetensors`
first): every variable as a float32 array under a flat, readable name
(`params.stages_2.0.repmlp_block.fc3.kernel`, `batch_stats.head_norm.mean`) and a JSON file with
the model's class and settings, its form, num_classes and its evaluation preprocessing.
`from_pretrained` reads such a directory, or a hub repository id through huggingface_hub (its
cache, `HF_HUB_CACHE` and offline mode `HF_HUB_OFFLINE=1` are honoured). safetensors files hold
a JSON header and raw bytes: reading one executes nothing.

Needs the `hub` extra: pip install 'repmlp-jax[hub]'.
"""

import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.data import imagenet
from repmlp_jax.models import factory
from repmlp_jax.pytorch import mapping

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
FORMAT_VERSION = 1
HUB_EXTRA = "pip install 'repmlp-jax[hub]'"
_SEP = '.'  # Flax module names hold no '.', so the flat names split back unambiguously.


class PretrainedError(ValueError):
  """A pretrained directory (or a safetensors file) is unusable: says what and what to do."""


def require_safetensors():
  """Imports safetensors' numpy API, or explains how to install the optional dependency."""
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading or writing .safetensors files needs safetensors, an optional '
                      f'dependency of repmlp-jax: {HUB_EXTRA}.') from e
  return safetensors_numpy


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a .safetensors file into numpy arrays, without executing anything from it.

  Args:
    path: the file, local or gs://.
  Returns:
    ({name: array}, the header's text metadata). bfloat16 arrays (unknown to numpy) become
    float32.
  Raises:
    PretrainedError: the file is truncated, corrupt or not a safetensors file.
  """
  require_safetensors()
  import safetensors  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not storage.resolve(path).is_file():
    raise FileNotFoundError(f'No safetensors file at {path}.')
  try:
    # The 'flax' framework reads every dtype (numpy lacks bfloat16); host memory, then numpy.
    with (storage.local_file(path) as local,
          jax.default_device(jax.local_devices(backend='cpu')[0]),
          safetensors.safe_open(local, framework='flax') as f):
      metadata = dict(f.metadata() or {})
      arrays = {}
      for name in f.keys():
        array = f.get_tensor(name)
        if array.dtype == jax.numpy.bfloat16:
          array = array.astype(np.float32)
        arrays[name] = np.asarray(array)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise PretrainedError(f'{path} is truncated or not a safetensors file ({e}); download or '
                          'write it again.') from e
  return arrays, metadata


def flat_variables(variables: Any) -> dict[str, np.ndarray]:
  """{'params': ..., 'batch_stats': ...} -> {'params.stem.conv.kernel': float32 array, ...}."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  bad = [k for k in flat if any(_SEP in part for part in k)]
  if bad:
    raise ValueError(f'Variable names must not contain {_SEP!r}: {bad[:3]}.')
  return {_SEP.join(k): np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def preprocessing(model: nn.Module, *, image_size: int | None = None, crop_ratio: float = 1.0,
                  mean: Sequence[float] = imagenet.IMAGENET_MEAN,
                  std: Sequence[float] = imagenet.IMAGENET_STD) -> dict[str, Any]:
  """The evaluation preprocessing recorded in config.json (defaults: the official evaluation).

  Args:
    model: the model (gives the default image size: its training resolution).
    image_size: side of the square input.
    crop_ratio: center crop side / resized shorter side (1.0 official; 0.875 mmpretrain's).
    mean, std: per-channel normalization of RGB pixels on the [0, 1] scale.
  Returns:
    {'image_size', 'crop_ratio', 'interpolation', 'mean', 'std'}.
  """
  size = image_size or getattr(model, 'image_size', None) or model.input_multiple
  if size % model.input_multiple:
    raise ValueError(f'image_size {size} does not fit {type(model).__name__}: it must be a '
                     f'multiple of {model.input_multiple}.')
  if not 0 < crop_ratio <= 1:
    raise ValueError(f'crop_ratio must be in (0, 1]; got {crop_ratio}.')
  if len(mean) != 3 or len(std) != 3:
    raise ValueError('mean and std need one value per RGB channel.')
  return {'image_size': int(size), 'crop_ratio': float(crop_ratio), 'interpolation': 'bilinear',
          'mean': [float(m) for m in mean], 'std': [float(s) for s in std]}


def official_name(model: nn.Module) -> str | None:
  """The variant `model` is (any num_classes and form), or None for custom settings."""
  for name in factory.available_models(include_private=True):
    if factory.create_model(name, num_classes=model.num_classes, deploy=model.deploy,
                           dtype=model.dtype, precision=model.precision) == model:
      return name
  return None


def pretrained_config(model: nn.Module, **preprocess: Any) -> dict[str, Any]:
  """What config.json holds for `model` (see `save_pretrained`)."""
  return {'library': 'repmlp_jax', 'format_version': FORMAT_VERSION,
          'architecture': official_name(model),
          'form': 'deploy' if model.deploy else 'training',
          'num_classes': int(model.num_classes),
          'model': factory.model_spec(model),
          'preprocessing': preprocessing(model, **preprocess)}


def save_pretrained(path: str | os.PathLike, model: nn.Module, variables: Any,
                    **preprocess: Any) -> str:
  """Writes `model.safetensors` and `config.json` to a new directory, atomically.

  Written as `outputs.write_new_directory` writes (config.json last, so a directory that has it
  is complete): an interrupted save leaves nothing usable under that name, and an existing path
  is refused.

  Args:
    path: the directory to create, local or gs://; it must not exist (missing parents are made).
    model: the module the variables belong to (training or deploy form).
    variables: {'params': ..., 'batch_stats': ...}.
    **preprocess: image_size, crop_ratio, mean, std of the evaluation (see `preprocessing`).
  Returns:
    The absolute path or URL written.
  """
  safetensors_numpy = require_safetensors()
  outputs.check_new_output(path)
  config = pretrained_config(model, **preprocess)
  flat = flat_variables(variables)
  _check_names_and_shapes(model, {k: v.shape for k, v in flat.items()}, 'the variables given')
  data = safetensors_numpy.save(flat,
                                metadata={'format': 'flax', 'library': 'repmlp_jax'})
  return outputs.write_new_directory(path, {
      WEIGHTS_NAME: data, CONFIG_NAME: (json.dumps(config, indent=2) + '\n').encode()})


def _is_local(path: str) -> bool:
  # A path that names a place on disk or in a bucket (even a missing one) is never sent to the hub.
  return (storage.is_remote(path) or os.path.exists(path) or path.startswith(('.', '/', '~'))
          or path.count('/') > 1
          or (os.altsep is not None and os.altsep in path))


def _hub_files(repo_id: str, revision: str | None, cache_dir: str | None) -> tuple[str, str]:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{repo_id!r} is not a local directory; loading it from the Hugging Face '
                      f'hub needs huggingface_hub: {HUB_EXTRA}.') from e
  files = []
  for name in (CONFIG_NAME, WEIGHTS_NAME):
    try:
      files.append(huggingface_hub.hf_hub_download(repo_id, name, revision=revision,
                                                   cache_dir=cache_dir))
    except hub_errors.LocalEntryNotFoundError as e:
      raise FileNotFoundError(
          f'{name} of {repo_id!r} is not in the hub cache ({cache_dir or "HF_HUB_CACHE"}) and '
          'cannot be downloaded (offline mode, HF_HUB_OFFLINE=1, or no network). Download it '
          'once while online, or pass a local directory.') from e
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError,
            hub_errors.EntryNotFoundError, hub_errors.HFValidationError) as e:
      raise FileNotFoundError(f'{repo_id!r} is neither a local directory nor a hub repository '
                              f'holding {name} ({type(e).__name__}).') from e
  return files[0], files[1]


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
  """The (config.json, model.safetensors) of a directory or a hub repository id.

  Args:
    path_or_repo_id: a directory written by `save_pretrained` (local or gs://), or 'org/name'
      on the hub.
    revision: the hub revision (branch, tag or commit); default: main.
    cache_dir: the hub cache (default: huggingface_hub's, i.e. HF_HUB_CACHE).
  Returns:
    The two file paths.
  """
  name = os.fspath(path_or_repo_id)
  if _is_local(name):
    directory = storage.resolve(name)
    with storage.reaching(directory):
      if not directory.is_dir():
        raise FileNotFoundError(f'No pretrained directory at {directory}.')
      files = tuple(os.fspath(directory / f) for f in (CONFIG_NAME, WEIGHTS_NAME))
      missing = [os.path.basename(f) for f in files if not storage.resolve(f).is_file()]
    if missing:
      raise FileNotFoundError(f'{directory} lacks {" and ".join(missing)}: expected a '
                              'directory written by save_pretrained (or convert.py export).')
    return files
  return _hub_files(name, revision, None if cache_dir is None else os.fspath(cache_dir))


def read_config(config_file: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks a config.json written by `save_pretrained`."""
  try:
    with storage.reaching(config_file):
      config = json.loads(storage.resolve(config_file).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PretrainedError(f'{config_file} is not valid JSON ({e}).') from e
  if not isinstance(config, dict) or config.get('library') != 'repmlp_jax':
    raise PretrainedError(f'{config_file} is not a repmlp_jax config (no "library": '
                          '"repmlp_jax"); it was written by another library.')
  if config.get('format_version', 0) > FORMAT_VERSION:
    raise PretrainedError(f'{config_file} has format version {config["format_version"]}; this '
                          f'version of repmlp_jax reads up to {FORMAT_VERSION}. Upgrade it.')
  return config


def model_from_config(config: Mapping[str, Any], source: str = 'config.json') -> nn.Module:
  """The model a config.json describes, checked against its form and num_classes."""
  spec = config.get('model')
  if not isinstance(spec, Mapping) or 'settings' not in spec:
    raise PretrainedError(f'{source} has no model settings ("model": {{"class", "settings"}}).')
  try:
    model = factory.model_from_spec(spec)
  except (TypeError, KeyError, AttributeError) as e:
    raise PretrainedError(f'{source} holds settings {spec.get("class")} does not take: {e}') from e
  except ValueError as e:
    raise PretrainedError(f'{source}: {e}') from e
  form = 'deploy' if model.deploy else 'training'
  if config.get('form', form) != form or config.get('num_classes', model.num_classes) != \
      model.num_classes:
    raise PretrainedError(f'{source} contradicts itself: form {config.get("form")!r} and '
                          f'num_classes {config.get("num_classes")} against settings with '
                          f'deploy={model.deploy}, num_classes={model.num_classes}.')
  return model


def _check_names_and_shapes(model: nn.Module, got: Mapping[str, tuple[int, ...]],
                            what: str) -> dict[tuple[str, ...], Any]:
  """Raises PretrainedError (the key report of `mapping`) unless `got` has exactly `model`'s
  flat names and shapes; `what` names where `got` comes from.

  Returns:
    The model's abstract variables, flattened (name tuple -> ShapeDtypeStruct).
  """
  abstract = traverse_util.flatten_dict(factory.abstract_variables(model))
  want = {_SEP.join(k): tuple(v.shape) for k, v in abstract.items()}
  try:
    mapping.check_keys(f'{official_name(model) or type(model).__name__} '
                       f'({"deploy" if model.deploy else "training"} form, '
                       f'{model.num_classes} classes; {what})', want, got)
  except mapping.KeyMismatchError as e:
    raise PretrainedError(str(e)) from e
  return abstract


def variables_from_flat(model: nn.Module, arrays: Mapping[str, np.ndarray],
                        source: str = WEIGHTS_NAME) -> Any:
  """Flat safetensors arrays -> `model`'s variables, after checking every name and shape."""
  abstract = _check_names_and_shapes(
      model, {k: np.shape(v) for k, v in arrays.items()},
      f'the weights in {source}, for the model its config.json describes')
  flat = {k: jax.numpy.asarray(arrays[_SEP.join(k)], abstract[k].dtype) for k in abstract}
  return traverse_util.unflatten_dict(flat)


def from_pretrained(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
  """Loads a model saved by `save_pretrained`, from a directory or the Hugging Face hub.

  Args:
    path_or_repo_id: a local directory, or a hub repository id ('org/name'), resolved by
      huggingface_hub: downloaded once into its cache, or read from the cache alone in offline
      mode (HF_HUB_OFFLINE=1).
    revision: the hub revision (branch, tag or commit); default: main.
    cache_dir: the hub cache directory (default: HF_HUB_CACHE or ~/.cache/huggingface/hub).
  Returns:
    (model, variables), in the form that was saved.
  Raises:
    PretrainedError: config.json names an unknown model or its weights do not fit it; the
      safetensors file is truncated or corrupt.
    FileNotFoundError: no such directory, or the repository is not available (offline).
  """
  config_file, weights_file = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir)
  model = model_from_config(read_config(config_file), config_file)
  arrays, _ = read_safetensors(weights_file)
  return model, variables_from_flat(model, arrays, weights_file)
