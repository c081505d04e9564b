"""Test setup: eight simulated CPU devices, so that sharding is tested on one machine."""

import os

# Before JAX initialises its backend: several CPU devices to test sharding on, quiet TF.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
