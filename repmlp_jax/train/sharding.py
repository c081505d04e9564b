"""Where arrays live: a Mesh over every device with one 'data' axis, and the sharding of each array.

Batches are split along 'data' (NamedSharding(mesh, P('data'))): data parallelism, with
BatchNorm statistics computed over the global batch because jit sees the whole sharded array.
The training state is replicated, except with FSDP: every array of the state (parameters,
BatchNorm statistics, the optimizer's moments) holding at least `min_size` elements is split
along 'data' on its largest axis that the mesh size divides (the large fc3 kernels, the FFN
kernels, the head and their Adam moments); XLA gathers them where they are used.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def placed(tree: Any, shardings: jax.sharding.Sharding | Any) -> Any:
  """`tree`'s shapes and dtypes as jax.ShapeDtypeStructs placed with `shardings`: one sharding
  for every leaf, or a pytree of them of `tree`'s structure (what jit's `lower` and orbax's
  restore take)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def fsdp_spec(shape: Sequence[int], mesh_size: int, min_size: int) -> P:
  """The partition of one array under FSDP: its largest axis divisible by the mesh size, if the
  array is large enough to be worth splitting; otherwise replicated."""
  if mesh_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  divisible = [a for a, n in enumerate(shape) if n % mesh_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda a: shape[a])
  return P(*[DATA_AXIS if a == axis else None for a in range(len(shape))])


def state_sharding(abstract_state: Any, mesh: Mesh, *, fsdp: bool = False,
                   min_size: int = 2**18) -> Any:
  """The sharding of every leaf of the training state.

  Args:
    abstract_state: the state's pytree of jax.ShapeDtypeStruct (from jax.eval_shape).
    mesh: from create_mesh.
    fsdp: split large arrays along 'data' (see module docstring); otherwise replicate all.
    min_size: arrays with fewer elements stay replicated under FSDP.
  Returns:
    A pytree of NamedSharding, the structure of `abstract_state`.
  """
  def one(leaf):
    spec = fsdp_spec(leaf.shape, mesh.size, min_size) if fsdp else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, abstract_state)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays (the process-local rows, in process order).

  Args:
    local_batch: numpy arrays whose leading axis is this process's share of the global batch.
    sharding: batch_sharding(mesh).
  Returns:
    jax.Arrays of leading size local_rows * process_count, sharded along 'data'.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
