"""One registration per model family: its reparam rule, its PyTorch key map and its classifier.

A family is a model class of `repmlp_jax.models` together with what the rest of the package needs
to handle it: the rule that turns its training-form variables into the deploy form
(`repmlp_jax.reparameterize`), the map between its variables and the authors' PyTorch state_dict
(`repmlp_jax.pytorch.keys_*`; None for a family without PyTorch checkpoints) and the name of its
classifier (the submodule that fine-tuning to a new number of classes starts afresh).
`reparam`, `load_torch`, `to_torch_state_dict` and the trainer's `load_pretrained` find a model's
pieces here (`of(model)`) instead of testing its type. A new family is one more entry in
`FAMILIES`.
"""

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import numpy as np

from repmlp_jax.models import pure_mlp
from repmlp_jax.models import repmlp_resnet
from repmlp_jax.models import repmlpnet
from repmlp_jax.pytorch import keys_repmlpnet
from repmlp_jax.pytorch import keys_resnet
from repmlp_jax.reparameterize import repmlpnet as repmlpnet_rule
from repmlp_jax.reparameterize import resnet as resnet_rule

StateDict = Mapping[str, np.ndarray]


class MMPretrainNames(NamedTuple):
  """The renames between the official key names and mmpretrain's, for a family it implements."""
  is_layout: Callable[[StateDict], bool]  # Whether a state_dict has mmpretrain's names.
  from_layout: Callable[[StateDict], dict[str, Any]]  # mmpretrain names -> official ones.
  to_layout: Callable[[StateDict], dict[str, Any]]  # Official names -> mmpretrain's.


class TorchKeys(NamedTuple):
  """A family's PyTorch key map: pure numpy functions over official-layout state_dicts.

  Every function works without torch and without orbax (the key map modules import neither).
  """
  marker: str  # A key that every official state_dict of this family holds and no other's does.
  # (name, overrides, deploy): create_model(name, deploy=deploy, **overrides) fits the state_dict;
  # name None: no registered variant, overrides hold every setting. Raises DetectionError.
  detect: Callable[[StateDict], tuple[str | None, dict[str, Any], bool]]
  is_deploy: Callable[[StateDict], bool]  # The form of the file, even when detect fails.
  from_torch: Callable[[StateDict, nn.Module], dict[str, Any]]  # (state_dict, model) -> variables
  to_torch: Callable[[Mapping[str, Any], nn.Module], dict[str, np.ndarray]]  # (variables, model)
  describe: Callable[[nn.Module], str]  # The model's settings in words, for messages.
  file_settings: tuple[str, ...]  # Settings a model named by the user still takes from the file.
  mmpretrain: MMPretrainNames | None  # None: the family has only the official layout.


class Family(NamedTuple):
  """Everything the package needs to know about one model class besides the class itself."""
  name: str  # For messages.
  reparam_variables: Callable[[nn.Module, Any], dict[str, Any]]  # (model, variables) -> deploy.
  classifier: str  # The classifier's name in `params` (and in the PyTorch state_dict).
  torch_keys: TorchKeys | None  # None: no PyTorch checkpoints exist for the family.


def _torch_keys(keys, marker: str, file_settings: tuple[str, ...], *,
                mmpretrain: bool = False) -> TorchKeys:
  """A key map module's functions as TorchKeys: every `pytorch/keys_*` module has the same names."""
  names = (MMPretrainNames(keys.is_mmpretrain, keys.from_mmpretrain, keys.to_mmpretrain)
           if mmpretrain else None)
  return TorchKeys(marker, keys.detect, keys.is_deploy, keys.variables_from_torch,
                   keys.variables_to_torch, keys.describe, file_settings, names)


FAMILIES: dict[type[nn.Module], Family] = {  # class: (name, reparam rule, classifier, key map)
    repmlpnet.RepMLPNet: Family(
        'RepMLPNet', repmlpnet_rule.reparam_variables, 'head',
        _torch_keys(keys_repmlpnet, 'conv_embedding.conv.weight',
                    ('num_classes', 'gp_hidden_divisor'), mmpretrain=True)),
    repmlp_resnet.RepMLPResNet: Family(
        'RepMLP-ResNet / ResNet-50', resnet_rule.reparam_variables, 'linear',
        _torch_keys(keys_resnet, 'stage0.0.conv.weight', ('num_classes',))),
    # The authors released no PyTorch model of the pure-MLP CIFAR net, hence no key map.
    pure_mlp.PureMLPNet: Family(
        'pure-MLP CIFAR net', resnet_rule.reparam_variables, 'linear', None),
}


def of(model: nn.Module | type[nn.Module]) -> Family:
  """The registered family of a model (or model class).

  Raises:
    TypeError: the class is not registered.
  """
  cls = model if isinstance(model, type) else type(model)
  for base in cls.__mro__:
    if base in FAMILIES:
      return FAMILIES[base]
  known = ', '.join(c.__name__ for c in FAMILIES)
  raise TypeError(f'{cls.__name__} is not a registered model family (known: {known}); add it to '
                  'repmlp_jax.families.FAMILIES.')


def torch_keys_of(model: nn.Module | type[nn.Module]) -> TorchKeys:
  """The PyTorch key map of a model's family.

  Raises:
    ValueError: the family has none (no PyTorch checkpoints exist for it).
    TypeError: the class is not registered.
  """
  family = of(model)
  if family.torch_keys is None:
    cls = model if isinstance(model, type) else type(model)
    with_keys = ', '.join(c.__name__ for c, f in FAMILIES.items() if f.torch_keys is not None)
    raise ValueError(f'No PyTorch key map is defined for {cls.__name__} ({family.name}); '
                     f'PyTorch checkpoints are supported for {with_keys}.')
  return family.torch_keys


def for_state_dict(state_dict: StateDict) -> type[nn.Module] | None:
  """The model class whose official state_dicts look like this one (by its marker key), or None."""
  for cls, family in FAMILIES.items():
    if family.torch_keys is not None and family.torch_keys.marker in state_dict:
      return cls
  return None
