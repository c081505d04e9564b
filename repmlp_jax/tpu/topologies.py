"""Cloud TPU targets by name, their chips' published figures, and their devices without a TPU.

Names: Cloud TPU accelerator types (`v4-8`, `v5p-128`, `v5e-4` = `v5litepod-4`, `v6e-8`) or a
chip grid (`v5e:2x2`, `v5p:2x2x1`). For v4 and v5p the accelerator type counts TensorCores, two
per chip (v5p-8 is 4 chips, a 2x2x1 grid); for v5e and v6e it counts chips. JAX sees one device
per chip on every generation (v4 and v5p run their two cores as one, "megacore").

`devices(target)` asks libtpu (the `tpu` extra) for the target's devices through
`jax.experimental.topologies`: no TPU needs to be attached, and programs lowered onto a Mesh of
those devices compile with the TPU compiler itself.
"""

import contextlib
import dataclasses
import math
import os
import re
from typing import Iterator

import jax

from repmlp_jax.commands import cli

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bfloat16 peak, HBM bandwidth and capacity."""
  name: str
  peak_bf16_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: int
  grid_dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
  cores_per_chip: int  # TensorCores an accelerator type's number counts per chip


# Cloud TPU's published figures per chip (cloud.google.com/tpu/docs/system-architecture-tpu-vm
# and the per-version pages).
CHIPS = {
    'v4': Chip('TPU v4', 275e12, 1228e9, 32 * GiB, 3, 2),
    'v5e': Chip('TPU v5e', 197e12, 819e9, 16 * GiB, 2, 1),
    'v5p': Chip('TPU v5p', 459e12, 2765e9, 95 * GiB, 3, 2),
    'v6e': Chip('TPU v6e', 918e12, 1640e9, 32 * GiB, 2, 1),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e'}
# Chip grids of the single-slice accelerator types of the 2-D generations (chips -> grid).
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
_MAX_3D_CHIPS = 4096  # 16x16x16, the largest power-of-two v4 / v5p slice.
KNOWN_FORMS = ('v4-8 .. v4-4096 and v5p-8 .. v5p-8192 (TensorCores: 2 per chip, a power of two), '
               f'v5e-N = v5litepod-N and v6e-N for N in {sorted(_GRIDS_2D)} (chips), or a chip '
               'grid such as v5e:2x2, v6e:2x4, v5p:2x2x1, v4:4x4x4')


class UnknownTopology(cli.ConfigError):
  """A topology name none of the known forms matches."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice: its generation, chip grid and figures."""
  name: str  # as given
  generation: str  # key of CHIPS
  grid: tuple[int, ...]

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def topology_name(self) -> str:
    """The name jax.experimental.topologies takes, e.g. 'v5e:2x2'."""
    return f'{self.generation}:{"x".join(map(str, self.grid))}'


def _grid_3d(chips: int) -> tuple[int, int, int] | None:
  """Cloud's grid of a power-of-two 3-D slice: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
  grid = [2, 2, 1]
  while math.prod(grid) < chips:
    smallest = min(grid)
    grid[max(i for i, n in enumerate(grid) if n == smallest)] *= 2
  return tuple(grid) if math.prod(grid) == chips else None


def parse(name: str) -> Target:
  """The Target a name stands for; UnknownTopology (one line naming the known forms) if none."""
  text = name.strip().lower()
  unknown = UnknownTopology(f'unknown TPU topology {name!r}; known forms: {KNOWN_FORMS}.')
  grid_form = re.fullmatch(r'(v\w+?):(\d+(?:x\d+)*)', text)
  type_form = re.fullmatch(r'(v\w+?)-(\d+)', text)
  match = grid_form or type_form
  if not match:
    raise unknown
  generation = _ALIASES.get(match.group(1), match.group(1))
  if generation not in CHIPS:
    raise unknown
  chip = CHIPS[generation]
  if grid_form:
    grid = tuple(int(n) for n in match.group(2).split('x'))
    if len(grid) != chip.grid_dims or min(grid) < 1:
      raise unknown
    return Target(name, generation, grid)
  count = int(match.group(2))
  if count % chip.cores_per_chip:
    raise unknown
  chips = count // chip.cores_per_chip
  grid = (_GRIDS_2D.get(chips) if chip.grid_dims == 2
          else _grid_3d(chips) if 4 <= chips <= _MAX_3D_CHIPS else None)
  if grid is None:
    raise unknown
  return Target(name, generation, grid)


class MissingLibtpu(OSError):
  """libtpu (the `tpu` extra) is not installed."""


def devices(target: Target) -> list:
  """The target's devices (one per chip), from libtpu; no TPU needs to be attached.

  Raises:
    MissingLibtpu: without the `tpu` extra.
  """
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise MissingLibtpu("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                        "(the 'tpu' extra).") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {}
  if target.chip.grid_dims == 3:
    options['chip_config_name'] = 'megacore'
  if target.chips == 1:  # libtpu's default host is 2x2 chips; a single chip is its own host.
    options['chips_per_host_bounds'] = (1, 1, 1)
  with _standalone_host():
    try:
      description = topologies.get_topology_desc(
          platform='tpu', topology_name=target.topology_name, **options)
    except jax.errors.JaxRuntimeError as e:
      raise UnknownTopology(f'libtpu has no topology {target.topology_name} ({target.name}): '
                            f'{str(e).strip().splitlines()[0]}; known forms: {KNOWN_FORMS}.') from e
  return list(description.devices)


# No TPU VM around: no metadata server to ask, and libtpu would warn at length about the host it
# cannot identify; this process stands for one stand-alone host (any single-host type does: the
# target's topology is given to get_topology_desc). Another process (a training run on this TPU
# VM, another compile) may hold libtpu's lock: a compile without a TPU does not need it.
_STANDALONE_HOST = (('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                    ('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_ACCELERATOR_TYPE', 'v5litepod-4'),
                    ('TPU_STDERR_LOG_LEVEL', '3'), ('TPU_MIN_LOG_LEVEL', '3'))


@contextlib.contextmanager
def _standalone_host() -> Iterator[None]:
  """libtpu's settings for a stand-alone host while it loads, then the environment as it was.

  They must not reach the processes this one starts later (train.py, convert.py in the tests):
  with ALLOW_MULTIPLE_LIBTPU_LOAD set, a plain CPU process loads libtpu and prints its warnings.
  """
  saved = {name: os.environ.get(name) for name, _ in _STANDALONE_HOST}
  for name, value in _STANDALONE_HOST:
    os.environ.setdefault(name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
