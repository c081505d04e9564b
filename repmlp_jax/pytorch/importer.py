"""`load_torch`: a PyTorch checkpoint (official or mmpretrain, training or deploy form) -> Flax.

Composes the safe file reader (`torch_files`) and the family's key mapping
(`torch_keys_repmlpnet`): read and unwrap the file, rename mmpretrain keys, detect the variant
from the tensor shapes (or take the given name), check every key and shape, convert, and
re-parameterize when the deploy form is asked of a training-form file.
"""

import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from repmlp_jax.models import factory as models
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.models import repmlpnet
from repmlp_jax.pytorch import mapping as state_dict_mapping
from repmlp_jax.pytorch import files as torch_files
from repmlp_jax.pytorch import keys_repmlpnet as repmlpnet_keys
from repmlp_jax.pytorch import keys_resnet as resnet_keys


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
    if isinstance(self.model, repmlpnet.RepMLPNet):
      variant = self.name or f'custom RepMLPNet ({repmlpnet_keys.describe(self.model)})'
    else:
      variant = self.name
    lines = [f'read: {self.file.describe()}',
             f'layout: {self.layout}; form in file: {"deploy" if self.file_deploy else "training"}',
             f'model: {variant}, num_classes={self.model.num_classes}'
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


def _detected_model(found: str | None, overrides: dict[str, Any], deploy: bool) -> nn.Module:
  if found is None:
    return repmlpnet.RepMLPNet(**overrides, deploy=deploy)
  return models.create_model(found, deploy=deploy, **overrides)


def _repmlpnet_for(sd: Mapping[str, np.ndarray], name: str | None
                   ) -> tuple[nn.Module, str | None, nn.Module | None]:
  """The RepMLPNet the state_dict is for: detected, or `name` with the file's head and form.

  Returns:
    (model, its official name or None, the detected model when `name` was given and detection
    worked, for error messages).
  """
  if name is None:
    found, overrides, deploy = repmlpnet_keys.detect(sd)
    return _detected_model(found, overrides, deploy), found, None
  name = models.resolve_name(name)
  try:
    found, overrides, deploy = repmlpnet_keys.detect(sd)
    detected = _detected_model(found, overrides, deploy)
    overrides = {k: overrides[k] for k in ('num_classes', 'gp_hidden_divisor') if k in overrides}
  except repmlpnet_keys.DetectionError:
    # The check of every key against the named model reports what is wrong in full.
    detected = None
    deploy = any(k.endswith('.fc3.bias') for k in sd)
    overrides = {'num_classes': np.shape(sd['head.weight'])[0]} if 'head.weight' in sd else {}
  return models.create_model(name, deploy=deploy, **overrides), name, detected


def _resnet_for(sd: Mapping[str, np.ndarray], name: str | None) -> tuple[nn.Module, str]:
  """The RepMLP-ResNet / ResNet-50 the state_dict is for: detected, or `name` with its head."""
  if name is None:
    found, overrides, deploy = resnet_keys.detect(sd)
    return models.create_model(found, deploy=deploy, **overrides), found
  name = models.resolve_name(name)
  deploy = 'stage0.0.bn.weight' not in sd
  overrides = {'num_classes': np.shape(sd['linear.weight'])[0]} if 'linear.weight' in sd else {}
  return models.create_model(name, deploy=deploy, **overrides), name


def _named(model: nn.Module, name: str | None) -> str:
  """A model by its variant name and form, or by its settings when it has no name."""
  form = 'deploy' if model.deploy else 'training'
  if name is None:
    return f'a custom {repmlpnet_keys.describe(model)}'
  return f'{models.resolve_name(name)} ({form} form)'


def _is_resnet(sd: Mapping[str, Any]) -> bool:
  return 'stage0.0.conv.weight' in sd


def import_torch(path_or_state_dict: Any, name: str | None = None, *, deploy: bool | None = None,
                 use_ema: bool = False) -> TorchImport:
  """Like `load_torch`, also returning what was detected (for tools that report it)."""
  file = _read(path_or_state_dict, use_ema)
  sd, layout = file.state_dict, 'official'
  if repmlpnet_keys.is_mmpretrain(sd):
    sd, layout = repmlpnet_keys.from_mmpretrain(sd), 'mmpretrain'
  # The two families are told apart by their stems' keys.
  if _is_resnet(sd):
    model, found = _resnet_for(sd, name)
    detected, keys = None, resnet_keys
  else:
    model, found, detected = _repmlpnet_for(sd, name)
    keys = repmlpnet_keys
  if deploy is False and model.deploy:
    raise ValueError('The checkpoint holds the deploy form, which cannot be turned back into the '
                     'training form; load it with deploy=None or deploy=True.')
  try:
    variables = keys.variables_from_torch(sd, model)
  except state_dict_mapping.KeyMismatchError as e:
    if detected is None or detected == model:
      raise
    detected_name = repmlpnet_keys.detect(sd)[0]
    hint = (f'{_named(model, found)}; the file holds {_named(detected, detected_name)}, which '
            'loads without a name (drop --model)')
    raise state_dict_mapping.KeyMismatchError(hint, e.missing, e.unexpected, e.misshaped) from None
  variables = jax.tree.map(jax.numpy.asarray, variables)
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
  ({'state_dict', 'meta'} or raw, zip or legacy serialization), in training or deploy form. Files
  are read without executing code from them.

  Args:
    path_or_state_dict: a .pth / .pt file, or a state_dict (torch tensors or numpy arrays).
    name: the variant (e.g. 'RepMLPNet-B224' or 'b224'); None detects it from the tensor shapes.
    deploy: None keeps the file's form; True gives the deploy form (re-parameterizing a
      training-form file); False requires a training-form file.
    use_ema: take the checkpoint's EMA weights instead of the model's.
  Returns:
    (model, variables): `model.apply(variables, x)` (NHWC x) gives PyTorch's logits.
  Raises:
    torch_files.CheckpointFileError: not a checkpoint, truncated, or would run code to load.
    state_dict_mapping.KeyMismatchError: every missing, unexpected and mis-shaped key.
    torch_keys_repmlpnet.DetectionError: the variant cannot be detected (pass `name`).
    ImportError: PyTorch is not installed (the message says how: torch_files.TORCH_EXTRA).
  """
  result = import_torch(path_or_state_dict, name, deploy=deploy, use_ema=use_ema)
  return result.model, result.variables
