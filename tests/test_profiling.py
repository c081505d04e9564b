"""config.profile_steps: a jax.profiler trace of the chosen training steps, on the CPU."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from repmlp_jax.commands import cli
from repmlp_jax.train import profiling


def test_a_two_step_trace_is_written(tmp_path):
  profiler = profiling.StepProfiler('2,3', str(tmp_path))
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  state = jnp.eye(64)
  for step in range(1, 5):
    profiler.before_step(step)
    state = step_fn(state)
    profiler.after_step(step, state)
    traced = glob.glob(os.path.join(profiler.directory, 'plugins', 'profile', '*', '*.xplane.pb'))
    assert bool(traced) == (step >= 3)  # Written when step 3 has finished, not before.
  profiler.close()
  assert os.path.getsize(traced[0]) > 0 and len(traced) == 1


@pytest.mark.parametrize('text', ['3', '3,2', '0,1', 'a,b', '1,2,3'])
def test_bad_step_ranges_are_one_line(text):
  with pytest.raises(cli.ConfigError, match='must be "START,END" with 1 <= START <= END') as e:
    profiling.parse_steps(text)
  assert cli.exit_status(e.value) == 2


def test_no_range_traces_nothing(tmp_path):
  assert profiling.parse_steps(None) is None and profiling.parse_steps('') is None
  profiler = profiling.StepProfiler(None, str(tmp_path))
  profiler.before_step(1)
  profiler.after_step(1, jnp.ones(2))
  profiler.close()
  assert not os.path.exists(profiler.directory)
