"""Trains a RepMLPNet: `python train.py --config configs/<experiment>.py --workdir DIR`.

The embedded default (no download, a few minutes on a laptop CPU):

    pip install -e '.[data]'
    python train.py --config configs/digits.py --workdir /tmp/repmlp-digits

Any config field can be overridden: `--config.global_batch_size=1024 --config.num_epochs=300`.

ImageNet end to end
-------------------
1. Data (once, ~150 GB of archives, hours): download ILSVRC2012_img_train.tar and
   ILSVRC2012_img_val.tar from https://image-net.org (login required), put them, still packed,
   into <DATA>/downloads/manual/ and build the tfds data set:

       tfds build imagenet2012 --data_dir=<DATA>

2. One host (every local GPU / TPU core; the batch is global and split over the devices):

       python train.py --config configs/imagenet_b224.py --workdir <WORKDIR> \\
           --config.data_dir=<DATA>

   Variants: imagenet_t224, imagenet_b224, imagenet_t256, imagenet_b256, imagenet_d256,
   imagenet_l256. The learning rate scales with --config.global_batch_size / 256.
   --config.fsdp=True also splits the large weights and the Adam moments over the devices.

3. Several hosts: run the same command on every host with --multihost (it calls
   jax.distributed.initialize() before anything else). <WORKDIR> and <DATA> must be visible to
   every host (e.g. a shared file system or gs:// buckets); each host reads its own share of the
   data.
   - TPU pod slices: nothing else; `gcloud compute tpus tpu-vm ssh <name> --worker=all
     --command="cd repmlp-jax && python train.py ... --multihost"`.
   - SLURM / Open MPI launches: detected automatically (srun / mpirun one process per host).
   - Other multi-node GPU setups: pass the coordinator on every host,
     `--multihost --coordinator_address=<host0>:1234 --num_processes=<N> --process_id=<i>`
     (or set JAX_COORDINATOR_ADDRESS and pass the other two).
   Only process 0 logs and shows the progress bar.

4. Resume: rerun the same command. The run continues from the last checkpoint in
   <WORKDIR>/checkpoints exactly as if it had not stopped. SIGTERM (and Ctrl-C) on one host, or
   a preemption notice on a multi-host job, saves a checkpoint at the next step and exits.

5. Results: eval top-1/top-5 of the training form and of the re-parameterized deploy form at every
   evaluation (metrics.jsonl, TensorBoard in <WORKDIR>/tensorboard); the final deploy model in
   <WORKDIR>/deploy (repmlp_jax.model_io.load_model); the best training state is kept next to the
   last one in <WORKDIR>/checkpoints.

Fine-tuning from an imported checkpoint: configs/finetune_b224.py.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and the deploy model go here.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (several hosts).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-node GPUs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it.
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The input pipeline runs on the CPU: leave accelerator memory to JAX.
  tf.config.set_visible_devices([], 'GPU')
  if _MULTIHOST.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from repmlp_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import trainer  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(_CONFIG.value.get('compilation_cache_dir'))
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get('preempted'):
    sys.exit(f'Stopped at step {result["step"]}; rerun the same command to resume.')


if __name__ == '__main__':
  app.run(main)
