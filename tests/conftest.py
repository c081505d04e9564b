"""Test setup: eight simulated CPU devices, so that sharding is tested on one machine, and fast
XLA compiles.

Most of the suite's time is XLA compiling small programs. LLVM's optimisation of the generated
CPU code is cut (the flags of tests/mutation/run.py and tests/train_worker.py): about a quarter
less CPU time per compile, no change to what a program computes beyond float rounding, which
the tests' tolerances already allow for. Subprocesses (train.py, the tf.data service) inherit
the setting. XLA_FLAGS that already name an optimisation level are left as they are.
"""

import os
import sys

# Triton stays unimported: where it is installed (CUDA builds of torch), torch's optimizer step
# imports it, and its bundled LLVM registers command-line options that the LLVM of jaxlib or
# TensorFlow, loaded earlier in the same process, already registered: the process aborts ("LLVM
# ERROR: inconsistency in registered CommandLine options") or crashes, depending on which test
# files share it. None in sys.modules makes `import triton` raise ImportError, which torch reads
# as "no triton"; no test needs it (torch runs on the CPU here).
sys.modules.setdefault('triton', None)

# Before JAX initialises its backend: several CPU devices to test sharding on, quiet TF.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0'
                             ' --xla_llvm_disable_expensive_passes=true').strip()
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
