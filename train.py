"""Trains a RepMLPNet: `python train.py --config configs/<experiment>.py --workdir DIR`.

The embedded default (no download; 48 s on 2 quiet CPU cores, 1 to 2 minutes under load):

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
   a preemption notice on a multi-host job, saves a checkpoint at the next step and exits with
   status 75 (EX_TEMPFAIL): requeue on it, e.g. SLURM `RequeueExit=75` or
   `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`, LSF `bsub -Q 75`, a Kubernetes / JobSet
   podFailurePolicy `onExitCodes: {operator: In, values: [75]}`. A damaged latest checkpoint
   is moved to <WORKDIR>/damaged_checkpoints and the newest readable one is used; a config of
   another model on an old workdir, a full disk or an unwritable workdir stops with one line.

Exit statuses: 0 done; 1 an error (one line on stderr; any --verbosity shows the traceback);
2 bad flags or config (one line, before jax and TensorFlow load); 75 stopped on request after
saving a checkpoint (repmlp_jax/commands/cli.py).

5. Results: eval top-1/top-5 of the training form and of the re-parameterized deploy form at every
   evaluation (metrics.jsonl, TensorBoard in <WORKDIR>/tensorboard); the final deploy model in
   <WORKDIR>/deploy (repmlp_jax.model_io.load_model); the best training state is kept next to the
   last one in <WORKDIR>/checkpoints.

Fine-tuning from an imported checkpoint: configs/finetune_b224.py.
"""

import difflib
import glob
import os
import re
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

EXIT_USAGE = 2  # repmlp_jax.commands.cli.EXIT_USAGE; importing repmlp_jax would load jax before parsing.
_HELP = {'-h': True, '--help': True, '-?': True, '--helpshort': True, '--helpfull': False}


def _usage_error(message: str) -> None:
  print(f'train.py: error: {message}', file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _nearest(name: str, choices) -> str:
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
  return f'; did you mean {close[0]}?' if close else ''


def _unknown_field(argv: list[str], error: BaseException) -> str | None:
  """One line for an override of a field the config does not have (config_flags' AttributeError).

  ml_collections puts the field and its nearest valid name in the message, escaped; the
  command line tells the full dotted path.
  """
  found = re.search(r'Did you mean "(.+?)" instead of "(.+?)"', str(error).replace('\\', ''))
  name = found.group(2) if found else str(error).strip('\'"')
  dotted = next((a[len('--config.'):].split('=', 1)[0] for a in argv
                 if a.startswith('--config.') and a.split('=', 1)[0].endswith(name)), None)
  if dotted is None:
    return None  # Not an override: the config file itself failed.
  hint = f'; did you mean {dotted[:-len(name)]}{found.group(1)}?' if found else ''
  return f'unknown config field {dotted} (--config.{dotted}){hint}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one-line errors and --help exiting 0 (before jax or TF load)."""
  for arg in argv[1:]:
    if arg in _HELP:
      app.usage(shorthelp=_HELP[arg], writeto_stdout=True)
      sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except SyntaxError as e:  # A config file that does not parse.
    _usage_error(_config_file_error(argv, e))
  except (flags.Error, AttributeError, KeyError) as e:
    # config_flags raises AttributeError for an override of an unknown field.
    if isinstance(e, (AttributeError, KeyError)):
      _usage_error(_unknown_field(argv, e) or _config_file_error(argv, e))
    if isinstance(e, flags.UnrecognizedFlagError):
      _usage_error(f'unknown flag --{e.flagname}' + _nearest(e.flagname, flags.FLAGS))
    _usage_error(str(e).strip().splitlines()[0])
  try:
    _CONFIG.value.keys()  # A config file that failed to load raises here, not deep in training.
  except (OSError, ImportError, AttributeError) as e:
    _usage_error(_config_file_error(argv, e))
  return rest


def _config_file_error(argv: list[str], e: BaseException) -> str:
  """One line for a config file that is missing or fails to load."""
  path = next((b if a == '--config' else a[len('--config='):]
               for a, b in zip(argv, argv[1:] + [''])
               if a == '--config' or a.startswith('--config=')), '')
  if not os.path.isfile(path.split(':', 1)[0]):
    known = glob.glob(os.path.join(os.path.dirname(path) or 'configs', '*.py'))
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.75)
    example = f'did you mean {close[0]}?' if close else 'e.g. --config configs/digits.py'
    return f'no config file at {path} (--config); {example}'
  cause = e.__cause__ or e
  where = f' (line {cause.lineno})' if isinstance(cause, SyntaxError) else ''
  return (f'cannot load the config {path}{where}: {type(cause).__name__}: '
          f'{str(cause).strip().splitlines()[0]}')


def main(argv):
  if len(argv) > 1:
    _usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it.
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:  # Before anything else touches jax.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from repmlp_jax.commands import cli  # pylint: disable=g-import-not-at-top
  from repmlp_jax import outputs  # pylint: disable=g-import-not-at-top
  try:  # Before any data is read or anything compiles.
    workdir = outputs.check_workdir(_WORKDIR.value)
  except OSError as e:
    cli.error('train.py', e)
    return cli.EXIT_ERROR
  tf = cli.import_tensorflow_quietly()
  # The input pipeline runs on the CPU: leave accelerator memory to JAX.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised (a second run in one process): as it was set.
    pass
  from repmlp_jax.commands import compilation_cache  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import trainer  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(_CONFIG.value.get('compilation_cache_dir'))
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, workdir)
  except trainer.USER_ERRORS as e:  # Said in one line; the traceback would only bury it.
    if flags.FLAGS['verbosity'].present:
      raise  # Asked for detail: the whole traceback.
    cli.error('train.py', e)
    return cli.exit_status(e)
  # The trainer has printed the one line that says where it stopped and how to resume.
  return cli.EXIT_STOPPED if result.get('preempted') else cli.EXIT_OK


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
