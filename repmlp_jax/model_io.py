"""Saving a model with its variables, and reading a model from any format this package writes.

`save_model` writes one directory holding `variables` (orbax StandardSave of {'params',
'batch_stats'}) and `model` (JSON: class and every setting), atomically by orbax (locally to a
temporary name, then renamed; on a gs:// bucket with a commit marker written last), so an
interrupted save never leaves a directory that looks complete. Paths are local or gs://
(`repmlp_jax.storage`).

`read_model` is the one place that tells the formats apart; every reader (`load_model`,
convert.py, predict.py, `Predictor.from_checkpoint`, train.py's `init_from`) goes through it:
a `save_model` directory, a hub directory (model.safetensors + config.json, `repmlp_jax.hub`),
a PyTorch .pth / .safetensors state_dict in the authors' or mmpretrain's layout
(`repmlp_jax.pytorch.importer`), and a train.py workdir or one of its checkpoints
(`repmlp_jax.train.workdir_model`).
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.models import factory
from repmlp_jax.train import sharding as sharding_lib


def save_model(path: str | os.PathLike, model: nn.Module, variables: Any, *,
               overwrite: bool = False) -> str:
  """Writes `model`'s settings and `variables` to the directory `path`.

  Args:
    path: a directory that must not exist yet (unless `overwrite`), local or gs://; missing
      parents are created.
    model: the module the variables belong to (training or deploy form).
    variables: {'params': ..., 'batch_stats': ...}.
    overwrite: replace an existing checkpoint at `path`.
  Returns:
    The absolute path written.
  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    outputs.WriteError: the disk filled up; one line, no partial directory left.
  """
  path = outputs.check_new_output(path, overwrite=overwrite)
  _check_variables(model, variables)
  target = storage.resolve(path)
  storage.make_parents(target)
  with (outputs.writing(path), storage.reaching(path),
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer):
    checkpointer.save(target, args=ocp.args.Composite(
        model=ocp.args.JsonSave(factory.model_spec(model)),
        variables=ocp.args.StandardSave(variables)), force=overwrite)
  return path


# What `read_model` accepts, in the words of its error messages.
WHAT_IS_READ = ('a directory written by convert.py, repmlp_jax.model_io.save_model or '
                'save_pretrained (hub layout), a train.py workdir (its checkpoints or deploy/), '
                'or a PyTorch .pth / .safetensors file')


@dataclasses.dataclass
class ReadModel:
  """A model read from a file or directory, and what was read, in words."""
  model: nn.Module
  variables: Any
  lines: list[str]  # For the commands to print: the source, the form, what was detected.


def model_format(path: str | os.PathLike) -> str:
  """What is at `path`: 'saved' (save_model), 'hub', 'pytorch' (a file) or 'training'.

  Raises:
    FileNotFoundError: nothing is there.
  """
  from repmlp_jax import hub  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import workdir_model  # pylint: disable=g-import-not-at-top
  path = storage.resolve(path)
  with storage.reaching(path):
    if path.is_file():
      return 'pytorch'
    if not path.exists():
      raise FileNotFoundError(f'No model at {path}: give {WHAT_IS_READ}.')
    if workdir_model.find(path) is not None:
      return 'training'
    if (path / hub.CONFIG_NAME).is_file():
      return 'hub'
  return 'saved'


def read_model(path: str | os.PathLike, *, name: str | None = None, use_ema: bool = False,
               step: int | None = None, sharding: jax.sharding.Sharding | None = None
               ) -> ReadModel:
  """Reads a model in any format this package writes (see the module docstring).

  Args:
    path: the file or directory, local or gs://.
    name: the variant of a PyTorch file (e.g. 'b224'); None detects it from the shapes.
    use_ema: the EMA weights of a PyTorch training checkpoint or of a train.py checkpoint.
    step: which checkpoint of a train.py workdir (default: the latest).
    sharding: where to place every array (default: the first device).
  Returns:
    The model (its form as stored), its variables and lines describing what was read.
  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: not a model, or an option that does not apply to its format.
  """
  from repmlp_jax import hub  # pylint: disable=g-import-not-at-top
  from repmlp_jax.pytorch import importer  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import workdir_model  # pylint: disable=g-import-not-at-top
  path = storage.name(path)
  kind = model_format(path)
  _check_options(path, kind, name=name, use_ema=use_ema, step=step)
  if kind == 'training':
    return ReadModel(*workdir_model.read(path, step=step, use_ema=use_ema, sharding=sharding))
  if kind == 'pytorch':
    result = importer.import_torch(path, name, use_ema=use_ema)
    model, variables, lines = result.model, result.variables, result.describe().splitlines()
  else:
    model, variables = (hub.from_pretrained(path) if kind == 'hub' else
                        _load_saved(path, sharding))
    lines = [f'read {"deploy" if model.deploy else "training"} form: {path}']
  if kind != 'saved':
    variables = jax.device_put(
        variables, sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return ReadModel(model, variables, lines)


def _check_options(path: str, kind: str, *, name: str | None, use_ema: bool,
                   step: int | None) -> None:
  if name is not None and kind != 'pytorch':
    raise ValueError(f'A model name (--model) applies to PyTorch files; {path} records its model.')
  if use_ema and kind not in ('pytorch', 'training'):
    raise ValueError(f'{path} holds one set of weights; EMA weights (--ema) come from PyTorch '
                     'training checkpoints and train.py checkpoints.')
  if step is not None and kind != 'training':
    raise ValueError(f'A step (--step) picks a checkpoint of a train.py workdir; {path} is not '
                     'one.')


def load_model(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None,
               name: str | None = None, use_ema: bool = False, step: int | None = None
               ) -> tuple[nn.Module, Any]:
  """Reads a model in any format this package writes: `read_model` without the description.

  Args:
    path: a `save_model` directory, a hub directory, a PyTorch file, a train.py workdir or one
      of its checkpoints.
    sharding: where to place every array (default: the first device).
    name, use_ema, step: as for `read_model`.
  Returns:
    (model, variables).
  """
  result = read_model(path, sharding=sharding, name=name, use_ema=use_ema, step=step)
  return result.model, result.variables


def _load_saved(path: str, sharding: jax.sharding.Sharding | None) -> tuple[nn.Module, Any]:
  """Reads a directory written by `save_model`."""
  path = storage.resolve(path)
  with storage.reaching(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    try:
      spec = checkpointer.restore(path, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    except (FileNotFoundError, ValueError, KeyError):
      raise ValueError(f'{path} is not a model directory of this package (it holds no model '
                       f'settings); give {WHAT_IS_READ}.') from None
    model = factory.model_from_spec(spec['model'])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpointer.restore(path, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(sharding_lib.placed(abstract_variables(model),
                                                             sharding))))
  return model, restored['variables']


def abstract_variables(model: nn.Module) -> Any:
  """Shapes and dtypes of `model`'s variables, without computing anything (see models.factory)."""
  return factory.abstract_variables(model)


def _check_variables(model: nn.Module, variables: Any) -> None:
  expected = jax.tree_util.tree_structure(abstract_variables(model))
  got = jax.tree_util.tree_structure(variables)
  if expected != got:
    raise ValueError(f'The variables do not belong to this {type(model).__name__} '
                     f'(deploy={getattr(model, "deploy", None)}): tree structures differ.')
