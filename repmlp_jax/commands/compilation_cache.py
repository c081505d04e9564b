"""JAX's persistent compilation cache, which train.py, predict.py and convert.py turn on.

Compiled programs are written to a directory and read back by the next process that compiles
the same program with the same JAX, backend and flags, so a second start of a run skips its
compilations. The directory: `$XDG_CACHE_HOME/repmlp_jax/jax_cache` (`~/.cache/...` when the
variable is unset); the environment variable REPMLP_JAX_COMPILATION_CACHE (or train.py's
`--config.compilation_cache_dir`) names another one, and an empty value turns the cache off.
"""

import os

import jax

ENV_VAR = 'REPMLP_JAX_COMPILATION_CACHE'


def default_dir() -> str:
  """$XDG_CACHE_HOME/repmlp_jax/jax_cache, or ~/.cache/repmlp_jax/jax_cache."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'repmlp_jax', 'jax_cache')


def resolve_dir(setting: str | None = None) -> str | None:
  """The cache directory a command uses: `setting`, else $REPMLP_JAX_COMPILATION_CACHE, else
  `default_dir()`; None when the one that applies is empty (cache off)."""
  if setting is None:
    setting = os.environ.get(ENV_VAR)
  if setting is None:
    return default_dir()
  return os.path.abspath(os.path.expanduser(setting)) if setting else None


def enable(setting: str | None = None) -> str | None:
  """Turns the persistent compilation cache on, before anything is compiled.

  Every program is cached, however short its compilation (JAX's defaults skip those under a
  second, which are most programs of a CPU run). A directory that cannot be created leaves the
  cache off with a warning: a cache never stops a command.

  Args:
    setting: a directory, '' for off, None for the environment variable or the default.
  Returns:
    The directory in use, or None when the cache is off.
  """
  directory = resolve_dir(setting)
  if directory is None:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f'warning: compilation cache off, cannot create {directory}: {e}. Set {ENV_VAR} (or '
          '--config.compilation_cache_dir) to a writable directory, or to "" to silence this.')
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)  # No size threshold.
  return directory
