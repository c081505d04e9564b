"""Saving and loading a model with its variables: an orbax checkpoint plus the model's settings.

One directory holds `variables` (orbax StandardSave of {'params', 'batch_stats'}) and `model`
(JSON: class and every setting), written atomically by orbax (locally to a temporary name, then
renamed; on a gs:// bucket with a commit marker written last), so an interrupted save never
leaves a directory that looks complete. Paths are local or gs:// (`repmlp_jax.storage`). Used by the
converter (imported weights), the trainer (the final deploy checkpoint, fine-tuning) and
inference.
"""

import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.models import factory as models


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
        model=ocp.args.JsonSave(models.model_spec(model)),
        variables=ocp.args.StandardSave(variables)), force=overwrite)
  return path


def load_model(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None
               ) -> tuple[nn.Module, Any]:
  """Reads a directory written by `save_model`.

  Args:
    path: the checkpoint directory, local or gs://.
    sharding: where to place every array (default: the first device).
  Returns:
    (model, variables).
  """
  path = storage.resolve(path)
  with storage.reaching(path):
    if not path.is_dir():
      raise FileNotFoundError(f'No model checkpoint at {path}: expected a directory written by '
                              'repmlp_jax.save_model, convert.py or train.py.')
  with storage.reaching(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    try:
      spec = checkpointer.restore(path, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    except (FileNotFoundError, ValueError, KeyError):
      raise ValueError(f'{path} is not a model directory of this package (it holds no model '
                       'settings); give one written by convert.py, train.py (<workdir>/deploy) '
                       'or repmlp_jax.model_io.save_model.') from None
    model = models.model_from_spec(spec['model'])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract_variables(model))
    restored = checkpointer.restore(path, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract)))
  return model, restored['variables']


def abstract_variables(model: nn.Module) -> Any:
  """Shapes and dtypes of `model`'s variables, without computing anything (see models.factory)."""
  return models.abstract_variables(model)


def _check_variables(model: nn.Module, variables: Any) -> None:
  expected = jax.tree_util.tree_structure(abstract_variables(model))
  got = jax.tree_util.tree_structure(variables)
  if expected != got:
    raise ValueError(f'The variables do not belong to this {type(model).__name__} '
                     f'(deploy={getattr(model, "deploy", None)}): tree structures differ.')
