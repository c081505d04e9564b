"""`load_torch`: a PyTorch checkpoint (official or mmpretrain, training or deploy form) -> Flax.

Composes the safe file reader (`files`) and the family's key map (found through
`repmlp_jax.families`): read and unwrap the file, rename mmpretrain keys, tell the family from
its marker key (or take the named model's), detect the variant from the tensor shapes (or take
the given name), check every key and shape, convert, and re-parameterize when the deploy form is
asked of a training-form file.
"""

import dataclasses
import os
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import numpy as np

from repmlp_jax import families
from repmlp_jax.models import factory
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.pytorch import mapping
from repmlp_jax.pytorch import files as torch_files


@dataclasses.dataclass
class TorchImport:
  """An imported model and what was found in the file."""
  model: nn.Module
  variables: Any
  name: str | None  # The official variant, or None for custom settings.
  file_deploy: bool  # Whether the file held the deploy form.
  layout: str  # 'official' or 'mmpretrain'.
  file: torch_files.TorchFile
  reparameterized: bool  # The file's training form was converted to the deploy form.

  def describe(self) -> str:
    """What was detected, in words."""
    if self.name is None:  # The settings in words name the class and num_classes.
      variant = f'custom {families.torch_keys_of(self.model).describe(self.model)}'
    else:
      variant = f'{self.name}, num_classes={self.model.num_classes}'
    lines = [f'read: {self.file.describe()}',
             f'layout: {self.layout}; form in file: {"deploy" if self.file_deploy else "training"}',
             f'model: {variant}'
             + (f', gp_hidden_divisor={self.model.gp_hidden_divisor}'
                if getattr(self.model, 'gp_hidden_divisor', 1) != 1 else '')]
    if self.reparameterized:
      lines.append('converted to the deploy form (reparam)')
    return '\n'.join(lines)


def _read(path_or_state_dict: Any, use_ema: bool) -> torch_files.TorchFile:
  # A state_dict of numpy arrays needs no torch (nor has EMA entries to choose from).
  if not use_ema and isinstance(path_or_state_dict, Mapping) and path_or_state_dict and all(
      isinstance(v, np.ndarray) for v in path_or_state_dict.values()):
    sd, prefix = torch_files.strip_prefix(path_or_state_dict)
    return torch_files.TorchFile(sd, '<state_dict>', 'in-memory', 'top level', prefix, (), ())
  if not isinstance(path_or_state_dict, (Mapping, str, os.PathLike)):
    raise TypeError('load_torch takes a checkpoint path or a state_dict; got '
                    f'{type(path_or_state_dict).__name__}.')
  return torch_files.read_torch_checkpoint(path_or_state_dict, use_ema=use_ema)


def _official_names(sd: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
  """The state_dict with the official key names, and the layout it had."""
  for family in families.FAMILIES.values():
    names = family.torch_keys.mmpretrain if family.torch_keys is not None else None
    if names is not None and names.is_layout(sd):
      return names.from_layout(sd), 'mmpretrain'
  return sd, 'official'


def _model_class(sd: Mapping[str, Any], name: str | None) -> type[nn.Module]:
  """The named model's class, or the class whose official state_dicts look like `sd`."""
  if name is not None:
    return factory.MODELS[factory.resolve_name(name)][0]
  cls = families.for_state_dict(sd)
  if cls is None:
    markers = ', '.join(f'{f.torch_keys.marker} ({f.name})' for f in families.FAMILIES.values()
                        if f.torch_keys is not None)
    sample = ', '.join(list(sd)[:5])
    raise mapping.DetectionError(
        f'Not a checkpoint of a known model: none of the keys {markers} is present; the keys '
        f'begin with: {sample}. Pass the model name to see a full key report.')
  return cls


def _detected_model(cls: type[nn.Module], found: str | None, overrides: dict[str, Any],
                    deploy: bool) -> nn.Module:
  if found is None:
    return cls(**overrides, deploy=deploy)
  return factory.create_model(found, deploy=deploy, **overrides)


def _model_for(cls: type[nn.Module], sd: Mapping[str, np.ndarray], name: str | None
               ) -> tuple[nn.Module, str | None, nn.Module | None]:
  """The model the state_dict is for: detected, or `name` with the file's head and form.

  Returns:
    (model, its official name or None, the detected model when `name` was given and detection
    worked, for error messages).
  """
  family, keys = families.of(cls), families.torch_keys_of(cls)
  if name is None:
    found, overrides, deploy = keys.detect(sd)
    return _detected_model(cls, found, overrides, deploy), found, None
  name = factory.resolve_name(name)
  try:
    found, overrides, deploy = keys.detect(sd)
    detected = _detected_model(cls, found, overrides, deploy)
    overrides = {k: overrides[k] for k in keys.file_settings if k in overrides}
  except mapping.DetectionError:
    # The check of every key against the named model reports what is wrong in full.
    detected = None
    deploy = keys.is_deploy(sd)
    classifier = f'{family.classifier}.weight'
    overrides = {'num_classes': np.shape(sd[classifier])[0]} if classifier in sd else {}
  return factory.create_model(name, deploy=deploy, **overrides), name, detected


def _named(model: nn.Module, name: str | None, keys: Any) -> str:
  """A model by its variant name and form, or by its settings when it has no name."""
  form = 'deploy' if model.deploy else 'training'
  if name is None:
    return f'a custom {keys.describe(model)}'
  return f'{factory.resolve_name(name)} ({form} form)'


def import_torch(path_or_state_dict: Any, name: str | None = None, *, deploy: bool | None = None,
                 use_ema: bool = False) -> TorchImport:
  """Like `load_torch`, also returning what was detected (for tools that report it)."""
  file = _read(path_or_state_dict, use_ema)
  sd, layout = _official_names(file.state_dict)
  cls = _model_class(sd, name)
  keys = families.torch_keys_of(cls)
  model, found, detected = _model_for(cls, sd, name)
  if deploy is False and model.deploy:
    raise ValueError('The checkpoint holds the deploy form, which cannot be turned back into the '
                     'training form; load it with deploy=None or deploy=True.')
  try:
    variables = keys.from_torch(sd, model)
  except mapping.KeyMismatchError as e:
    if detected is None or detected == model:
      raise
    hint = (f'{_named(model, found, keys)}; the file holds '
            f'{_named(detected, keys.detect(sd)[0], keys)}, which loads without a name '
            '(drop --model)')
    raise mapping.KeyMismatchError(hint, e.missing, e.unexpected, e.misshaped) from None
  variables = jax.tree.map(jax.numpy.asarray, variables)
  # What every key map guarantees (its own checks ran above): float32 variables that fit.
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, factory.abstract_variables(model))
  result = TorchImport(model, variables, found, model.deploy, layout, file, False)
  if deploy and not model.deploy:
    result.model, result.variables = reparameterize.reparam(model, variables)
    result.reparameterized = True
  return result


def load_torch(path_or_state_dict: Any, name: str | None = None, *, deploy: bool | None = None,
               use_ema: bool = False) -> tuple[nn.Module, Any]:
  """Imports a PyTorch RepMLPNet, RepMLP-ResNet or ResNet-50 checkpoint.

  Accepts the authors' files (raw state_dict; {'model': ...} training checkpoints, whose pickled
  yacs config is read as inert data; EMA entries; `module.` prefixes) and mmpretrain's
  ({'state_dict', 'meta'} or raw, zip or legacy serialization), in training or deploy form, and
  either state_dict saved as .safetensors. Files are read without executing code from them.

  Args:
    path_or_state_dict: a .pth / .pt / .safetensors file, or a state_dict (torch tensors or
      numpy arrays).
    name: the variant (e.g. 'RepMLPNet-B224' or 'b224'); None detects it from the tensor shapes.
    deploy: None keeps the file's form; True gives the deploy form (re-parameterizing a
      training-form file); False requires a training-form file.
    use_ema: take the checkpoint's EMA weights instead of the model's.
  Returns:
    (model, variables): `model.apply(variables, x)` (NHWC x) gives PyTorch's logits.
  Raises:
    files.CheckpointFileError: not a checkpoint, truncated, or would run code to load.
    mapping.KeyMismatchError: every missing, unexpected and mis-shaped key.
    mapping.DetectionError: the model cannot be detected (pass `name`).
    ValueError: the named model's family has no PyTorch checkpoints.
    ImportError: PyTorch is not installed (the message says how: torch_files.TORCH_EXTRA;
      .safetensors files need safetensors instead: `pip install -e '.[hub]'`).
  """
  result = import_torch(path_or_state_dict, name, deploy=deploy, use_ema=use_ema)
  return result.model, result.variables
