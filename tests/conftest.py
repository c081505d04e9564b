"""Test setup: eight simulated CPU devices, so that sharding is tested on one machine, and fast
XLA compiles.

Most of the suite's time is XLA compiling small programs. LLVM's optimisation of the generated
CPU code is cut (the flags of tests/mutation/run.py and tests/train_worker.py): about a quarter
less CPU time per compile, no change to what a program computes beyond float rounding, which
the tests' tolerances already allow for. Subprocesses (train.py, the tf.data service) inherit
the setting. XLA_FLAGS that already name an optimisation level are left as they are.
"""

import os

# Before JAX initialises its backend: several CPU devices to test sharding on, quiet TF.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0'
                             ' --xla_llvm_disable_expensive_passes=true').strip()
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
