"""Helpers shared by the tests."""

import contextlib
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util


def randomize_batch_norm(variables, seed: int = 0):
  """Every BatchNorm far from identity: scale ~ U(0.2, 0.6), bias and mean ~ N(0, 0.3), var ~ U(0.5, 2).

  Without this, fused BNs are near-identity maps and a broken fusion can go unnoticed. Scales
  below 1 (as in trained networks) keep the activations of a deep random residual network
  bounded: with scales around 1, B224's activations reach 1e5 and its float32 forward pass alone
  drifts 2e-5 from float64, so no float32 comparison could be tighter than that.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    is_bn = 'batch_stats' in name or any(
        k in name for k in ("'bn'", 'prebn', 'norm', 'fc3_bn', "'bn1'", "'bn2'", "'bn3'"))
    if not is_bn or leaf.ndim != 1:
      return leaf
    last = name.rsplit("'", 2)[-2]
    if last == 'var':
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif last == 'scale':
      value = rng.uniform(0.2, 0.6, leaf.shape)
    elif last in ('bias', 'mean'):
      value = rng.normal(0.0, 0.3, leaf.shape)
    else:
      return leaf
    return jax.numpy.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(a).max())


@contextlib.contextmanager
def tmpfs(directory, size: str):
  """A real small file system at `directory` (tmpfs of `size`, e.g. '3m') for a real full disk.

  Skips the test where mounting is not allowed (mount needs root on Linux).
  """
  os.makedirs(directory, exist_ok=True)
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(directory)],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here (mount: {done.stderr.strip() or done.returncode})')
  try:
    yield directory
  finally:
    subprocess.run(['umount', str(directory)], check=True)


def float32_params(variables) -> set[str]:
  """The 'a/b/scale'-style names of the float32 leaves of variables['params']."""
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  return {k for k, p in params.items() if p.dtype == jnp.float32}


def batch_norm_params(variables) -> set[str]:
  """The names of the BatchNorms' scales and shifts (the modules holding 'batch_stats')."""
  norms = {k.rsplit('/', 1)[0] for k in traverse_util.flatten_dict(variables['batch_stats'],
                                                                   sep='/')}
  return {f'{norm}/{p}' for norm in norms for p in ('scale', 'bias')}
