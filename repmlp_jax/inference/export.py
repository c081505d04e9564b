"""A serialized deploy artifact: StableHLO via `jax.export`, runnable without the model code.

The artifact maps normalized NHWC float32 images (see `repmlp_jax.inference.image_files`) to
float32 logits. The weights are embedded as constants, so the file alone is enough:

    exported = repmlp_jax.inference.export.load_exported('b224.bin')   # needs only jax
    logits = exported.call(images)                           # (N, 224, 224, 3) -> (N, 1000)

The batch dimension is symbolic by default (any N, one file); the spatial size is fixed.
"""

import os

import jax
from jax import export as jax_export
import jax.numpy as jnp

from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.inference import predictor as inference


def export_predictor(predictor: 'inference.Predictor', *, batch_size: int | None = None,
                     platforms: tuple[str, ...] | None = None) -> jax_export.Exported:
  """Exports a Predictor's forward pass (images -> logits) with its weights embedded.

  Args:
    predictor: the model to export, in the form and dtype it runs (deploy form by default).
    batch_size: a fixed batch size; None exports a symbolic batch dimension.
    platforms: lowering platforms, e.g. ('cpu', 'cuda'); default: the predictor's device.
  Returns:
    A `jax.export.Exported`; `.call(images)` runs it, `save_exported` writes it.
  """
  size = predictor.image_size
  batch = jax_export.symbolic_shape('batch')[0] if batch_size is None else batch_size
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  model, variables, dtype = predictor.model, predictor.variables, predictor.dtype

  def logits(images):
    return model.apply(variables, images.astype(dtype), train=False).astype(jnp.float32)

  platforms = platforms or (predictor.device.platform,)
  return jax_export.export(jax.jit(logits), platforms=platforms)(spec)


def save_exported(path: str | os.PathLike, exported: jax_export.Exported) -> str:
  """Writes a serialized artifact atomically; never replaces an existing file.

  Args:
    path: the file to create (local or gs://).
    exported: from `export_predictor`.
  Returns:
    The absolute path written.
  """
  data = exported.serialize()
  return outputs.write_new_file(path, lambda f: f.write(data))


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
  """Reads an artifact written by `save_exported` (no model code needed to run it)."""
  source = storage.resolve(path)
  with storage.reaching(source):
    if not source.is_file():
      raise FileNotFoundError(f'No exported model at {os.fspath(path)!r}.')
    data = source.read_bytes()
  try:
    return jax_export.deserialize(bytearray(data))
  except Exception as e:  # The flatbuffer reader raises assorted types on foreign bytes.
    raise ValueError(f'{path!r} is not a serialized jax.export artifact ({type(e).__name__}: '
                     f'{e}).') from e
