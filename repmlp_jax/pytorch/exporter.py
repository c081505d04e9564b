"""Export to PyTorch: Flax variables -> the official state_dict, as tensors or a file.

The model's family (`repmlp_jax.families`) gives the key map. A training-form model gives the
authors' training layout (their model loads it strictly); a deploy-form model gives a state_dict
that the official deploy model (`deploy=True`) loads strictly and that computes the same logits.
`layout='mmpretrain'` writes mmpretrain's key names instead (RepMLPNet only), wrapped as
{'state_dict': ..., 'meta': {...}} in a .pth file. A `.safetensors` file holds the same flat
state_dict (either layout, no wrapper), written without torch, as `safetensors.torch.save_file`
would.
"""

import collections
import os
from typing import Any

import flax.linen as nn
import numpy as np

from repmlp_jax import outputs
from repmlp_jax import families
from repmlp_jax import hub
from repmlp_jax.pytorch import files as torch_files

LAYOUTS = ('official', 'mmpretrain')


def to_torch_state_dict(model: nn.Module, variables: Any, *,
                        layout: str = 'official') -> 'collections.OrderedDict[str, Any]':
  """The PyTorch state_dict of `model`'s variables.

  Args:
    model: a RepMLPNet, RepMLP-ResNet or ResNet-50 (training or deploy form): a family with a
      PyTorch key map in `repmlp_jax.families`.
    variables: its {'params', 'batch_stats'}.
    layout: 'official' (the authors' key names and order) or 'mmpretrain'.
  Returns:
    An OrderedDict of CPU torch tensors (num_batches_tracked = 0).
  Raises:
    ValueError: an unknown layout, one the family lacks, or a family without PyTorch checkpoints.
  """
  torch = torch_files.require_torch()
  return collections.OrderedDict((k, torch.from_numpy(v.copy()))
                                 for k, v in _arrays(model, variables, layout).items())


def _arrays(model: nn.Module, variables: Any, layout: str) -> dict[str, np.ndarray]:
  if layout not in LAYOUTS:
    raise ValueError(f'Unknown layout {layout!r}; choose one of {LAYOUTS}.')
  keys = families.torch_keys_of(model)
  if layout == 'mmpretrain' and keys.mmpretrain is None:
    raise ValueError(f'{families.of(model).name} models have only the official layout '
                     '(mmpretrain has none).')
  arrays = keys.to_torch(variables, model)
  if layout == 'mmpretrain':
    arrays = keys.mmpretrain.to_layout(arrays)
  return arrays


def save_torch(path: str | os.PathLike, model: nn.Module, variables: Any, *,
               layout: str = 'official') -> str:
  """Writes `to_torch_state_dict(model, variables)` with torch.save; never overwrites.

  The official layout is a raw state_dict (like the released files); mmpretrain's is
  {'state_dict': ..., 'meta': {}}. A path ending in `.safetensors` gets the flat state_dict as
  a safetensors file instead (no torch needed; the `hub` extra). The file is written atomically
  (`outputs.write_new_file`), so an interrupted export leaves no partial file.

  Args:
    path: the .pth or .safetensors file to create (local or gs://); must not exist.
    model, variables: as for `to_torch_state_dict`.
    layout: 'official' or 'mmpretrain'.
  Returns:
    The absolute path written.
  """
  outputs.check_new_output(path)  # Before the conversion, which can take a while.
  if os.fspath(path).endswith('.safetensors'):
    safetensors_numpy = hub.require_safetensors()
    data = safetensors_numpy.save(
        {k: np.ascontiguousarray(v) for k, v in _arrays(model, variables, layout).items()},
        metadata={'format': 'pt'})
    return outputs.write_new_file(path, lambda f: f.write(data))
  torch = torch_files.require_torch()
  sd = to_torch_state_dict(model, variables, layout=layout)
  obj = sd if layout == 'official' else {'state_dict': sd, 'meta': {}}
  return outputs.write_new_file(path, lambda f: torch.save(obj, f))
