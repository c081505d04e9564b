"""The persistent compilation cache: where it goes, how it is turned off, and that a second
process compiles from it.
"""

import json
import os
import subprocess
import sys

from repmlp_jax.commands import compilation_cache

# A fresh process: turns the cache on (environment variable), compiles one small function and
# prints the cache hits and misses JAX records (one per program, the input's too), and the
# compile time.
_COMPILE_ONCE = '''
import json, time
import jax, jax.numpy as jnp
from jax import monitoring
from repmlp_jax.commands import compilation_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = compilation_cache.enable()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0 + jnp.cos(x).mean())
start = time.perf_counter()
f.lower(jnp.ones((64, 32))).compile()
print(json.dumps({'dir': directory, 'seconds': time.perf_counter() - start,
                  'hits': events.count('/jax/compilation_cache/cache_hits'),
                  'misses': events.count('/jax/compilation_cache/cache_misses')}))
'''


def _compile_in_fresh_process(cache_dir: str) -> dict:
  env = {**os.environ, compilation_cache.ENV_VAR: cache_dir, 'JAX_PLATFORMS': 'cpu'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
  out = subprocess.run([sys.executable, '-c', _COMPILE_ONCE], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_second_process_compiles_from_the_cache(tmp_path):
  cache_dir = str(tmp_path / 'cache')
  first = _compile_in_fresh_process(cache_dir)
  assert first['dir'] == cache_dir and first['misses'] >= 1 and first['hits'] == 0
  assert len(os.listdir(cache_dir)) >= first['misses']  # Every compiled program was written.
  second = _compile_in_fresh_process(cache_dir)
  assert (second['misses'], second['hits']) == (0, first['misses'])
  assert second['seconds'] < first['seconds']


def test_cache_directory_settings(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compilation_cache.resolve_dir() == str(tmp_path / 'repmlp_jax' / 'jax_cache')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compilation_cache.resolve_dir() == str(tmp_path / 'home/.cache/repmlp_jax/jax_cache')
  monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / 'env'))
  assert compilation_cache.resolve_dir() == str(tmp_path / 'env')
  assert compilation_cache.resolve_dir(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  assert compilation_cache.resolve_dir('') is None  # An empty setting turns it off ...
  monkeypatch.setenv(compilation_cache.ENV_VAR, '')
  assert compilation_cache.resolve_dir() is None and compilation_cache.enable() is None


def test_unwritable_directory_leaves_the_cache_off(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  assert compilation_cache.enable(str(blocker / 'cache')) is None
  assert 'compilation cache off' in capsys.readouterr().out
