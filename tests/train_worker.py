"""One process of the two-process training test (tests/test_train_steps.py).

    python -m tests.train_worker PORT PROCESS_ID OUT.npz

Joins a 2-process jax.distributed CPU cluster on localhost (2 devices per process, gloo
collectives), trains the test model on the test's global batches, feeding only this process's
rows of each batch, and writes the losses and the final parameters to OUT.npz.
"""

import os
import sys

# Fast compiles for the tiny model; both processes use the same flags, so they run one program.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true')
import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port: int, process_id: int, out: str) -> None:
  jax.config.update('jax_num_cpu_devices', 2)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import experiment  # pylint: disable=g-import-not-at-top
  from tests import test_train_steps as t  # pylint: disable=g-import-not-at-top

  exp = experiment.Experiment(t.tiny_config(), num_classes=t.NUM_CLASSES, steps=t.tiny_steps())
  state = exp.init_state()
  rows = t.GLOBAL_BATCH // jax.process_count()
  mine = slice(process_id * rows, (process_id + 1) * rows)
  losses = []
  for batch in t.global_batches():
    local = {k: v[mine] for k, v in batch.items()}
    state, measurements = exp.train_step(state, sharding.global_batch(local, exp.batch_sharding))
    losses.append(measurements['loss'])
  params = multihost_utils.process_allgather(state['params'], tiled=True)
  leaves = jax.tree.leaves(params)
  np.savez(out, losses=np.asarray([float(x) for x in losses]), num_leaves=len(leaves),
           device_count=jax.device_count(), process_count=jax.process_count(),
           **{f'param_{j}': np.asarray(leaf) for j, leaf in enumerate(leaves)})
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
