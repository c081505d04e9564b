"""Markers for tests that need conftest.py's eight simulated CPU devices.

On a host whose default backend is an accelerator, jax.devices() lists that backend's devices
(often one), not the simulated CPUs: such tests skip with the reason instead of failing.
"""

import jax
import pytest

NEEDED = 8


def _reason() -> str:
  backend, count = jax.default_backend(), jax.device_count()
  if backend == 'cpu' and count == NEEDED:
    return ''
  return (f'needs the {NEEDED} simulated CPU devices of tests/conftest.py as the default backend; '
          f'this host runs on {count} {backend} device(s) (JAX_PLATFORMS=cpu runs it here)')


needs_8_cpu_devices = pytest.mark.skipif(bool(_reason()), reason=_reason() or 'unused')
