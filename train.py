"""Trains a RepMLPNet: `python train.py --config <experiment> --workdir DIR`.

The experiment is a name in configs/ (`--config imagenet_b224`) or a config file
(`--config configs/imagenet_b224.py`, `--config my_config.py:<argument for get_config>`).
The embedded default (no download; its time on 2 CPU cores is in the README, Training):

    pip install -e '.[data]'
    python train.py --config digits --workdir /tmp/repmlp-digits

Any config field can be overridden: `--config.global_batch_size=1024 --config.num_epochs=300`.

ImageNet end to end
-------------------
1. Data (once, ~150 GB of archives, hours): download ILSVRC2012_img_train.tar and
   ILSVRC2012_img_val.tar from https://image-net.org (login required), put them, still packed,
   into <DATA>/downloads/manual/ and build the tfds data set:

       tfds build imagenet2012 --data_dir=<DATA>

2. One host (every local GPU / TPU core; the batch is global and split over the devices):

       python train.py --config imagenet_b224 --workdir <WORKDIR> --config.data_dir=<DATA>

   Variants: imagenet_t224, imagenet_b224, imagenet_t256, imagenet_b256, imagenet_d256,
   imagenet_l256. The learning rate scales with --config.global_batch_size / 256.
   The large weights and their Adam moments are split over the devices (FSDP, the default;
   --config.fsdp=False keeps a full copy on each).

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

Errors are one line on stderr (flags and config are checked before jax and TensorFlow load);
any --verbosity shows the traceback and the libraries' logs. A start that fails before its first
step leaves the workdir as it was (and no workdir if it created it). Exit statuses: README, "The
commands".

5. Results: eval top-1/top-5 of the training form and of the re-parameterized deploy form at every
   evaluation (metrics.jsonl, TensorBoard in <WORKDIR>/tensorboard); the final deploy model in
   <WORKDIR>/deploy (repmlp_jax.model_io.load_model); the best training state is kept next to the
   last one in <WORKDIR>/checkpoints. The last line says the final accuracies and where these are.
   The training form exports like any checkpoint: `python convert.py export <WORKDIR> out.pth`
   (--step N, --ema; also reparam, onnx, predict.py --checkpoint <WORKDIR>).

Fine-tuning from an imported checkpoint: configs/finetune_b224.py.
"""

import difflib
import os
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(ROOT, 'configs')
# The exit statuses, from the one module that defines them, read without importing the package
# (which would load jax before the flags are checked).
_CLI = runpy.run_path(os.path.join(ROOT, 'repmlp_jax', 'commands', 'cli.py'))

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config: a name in configs/ (imagenet_b224), a file '
    '(configs/imagenet_b224.py, my_config.py), either with :<argument> for its get_config.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and the deploy model go here.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (several hosts).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-node GPUs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])

_HELP = {'-h': True, '--help': True, '-?': True, '--helpshort': True, '--helpfull': False}


class UsageError(Exception):
  """A command-line mistake, said in one line before anything heavy loads."""


def known_configs() -> list[str]:
  """The names --config takes alone: the experiment files in configs/."""
  return sorted(name[:-3] for name in os.listdir(CONFIGS)
                if name.endswith('.py') and name not in ('__init__.py', 'common.py'))


def _nearest(name: str, choices, n: int = 1, cutoff: float = 0.5) -> list[str]:
  return difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)


def resolve_config(value: str) -> str:
  """--config's value as a file path (with its :argument): a path, or a name in configs/.

  `imagenet_b224`, `imagenet_b224.py` and `imagenet_b224:arg` name configs/imagenet_b224.py
  when no such file exists where the command runs; a relative path is also looked for next to
  train.py (`configs/digits.py` from any directory).
  """
  path, colon, argument = value.partition(':')
  if os.path.isfile(path):
    return value
  if not os.path.isabs(path) and os.path.isfile(os.path.join(ROOT, path)):
    return os.path.join(ROOT, path) + colon + argument  # configs/x.py from another directory.
  if path and os.sep not in path and (os.altsep is None or os.altsep not in path):
    name = path[:-3] if path.endswith('.py') else path
    if name in known_configs():
      return os.path.join(CONFIGS, name + '.py') + colon + argument
    close = _nearest(name, known_configs(), n=3)
    nearest = (f'nearest known configs: {", ".join(close)}' if close else
               f'known configs: {", ".join(known_configs())}')
    raise UsageError(f'no config file at {path} and no config named {name} in {CONFIGS} '
                     f'(--config); {nearest}.')
  folder = os.path.dirname(path)
  if not os.path.isdir(folder) and os.path.isdir(os.path.join(ROOT, folder)):
    folder = os.path.join(ROOT, folder)
  known = ([os.path.join(os.path.dirname(path), f) for f in os.listdir(folder)
            if f.endswith('.py')] if os.path.isdir(folder) else [])
  close = _nearest(path, known, cutoff=0.75)
  example = f'did you mean {close[0]}?' if close else 'e.g. --config imagenet_b224'
  raise UsageError(f'no config file at {path} (--config); {example}')


def load_config(value: str) -> config_dict.ConfigDict:
  """Runs the config file's get_config (with the :argument, if any); one line if it fails."""
  path, colon, argument = value.partition(':')
  try:
    config = runpy.run_path(path)['get_config'](*([argument] if colon else []))
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's file)
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    message = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UsageError(f'cannot load the config {path}{where}: {type(e).__name__}: '
                     f'{message}') from None
  if not isinstance(config, config_dict.ConfigDict):
    raise UsageError(f'{path}: get_config() returned {type(config).__name__}, not a ConfigDict.')
  return config


def check_overrides(argv: list[str], config: config_dict.ConfigDict) -> None:
  """Refuses an override of a field the config lacks, naming the nearest field that exists."""
  for arg in argv:
    if not arg.startswith(('--config.', '--noconfig.')):
      continue
    dotted = arg.split('.', 1)[1].split('=', 1)[0]
    node, parents = config, []
    for part in dotted.split('.'):
      if not isinstance(node, config_dict.ConfigDict):
        break  # A value's own structure: ml_collections' parser decides.
      if part not in node:
        close = _nearest(part, node.keys())
        hint = f'; did you mean {".".join(parents + close)}?' if close else ''
        raise UsageError(f'unknown config field {dotted} (--config.{dotted}){hint}')
      node, parents = node[part], parents + [part]


def _config_value(argv: list[str]) -> tuple[int, str] | None:
  """(index in argv, value) of --config, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i, arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one-line errors and --help exiting 0 (before jax or TF load)."""
  for arg in argv[1:]:
    if arg in _HELP:
      app.usage(shorthelp=_HELP[arg], writeto_stdout=True)
      sys.exit(0)
  argv = list(argv)
  try:
    found = _config_value(argv)
    if found is not None:
      index, value = found
      resolved = resolve_config(value)
      check_overrides(argv, load_config(resolved))
      argv[index] = resolved if argv[index] == value else f'--config={resolved}'
    return flags.FLAGS(argv)
  except UsageError as e:
    message = str(e)
  except flags.UnrecognizedFlagError as e:
    close = _nearest(e.flagname, flags.FLAGS)
    message = f'unknown flag --{e.flagname}' + (f'; did you mean --{close[0]}?' if close else '')
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()[0]
  print(f'train.py: error: {message}', file=sys.stderr)
  sys.exit(_CLI['EXIT_USAGE'])


def main(argv):
  if len(argv) > 1:
    print(f'train.py: error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return _CLI['EXIT_USAGE']
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  verbose = flags.FLAGS['verbosity'].present  # Any --verbosity: library logs and tracebacks.
  if not verbose:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:  # Before anything else touches jax.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from repmlp_jax.commands import cli  # pylint: disable=g-import-not-at-top
  from repmlp_jax import outputs  # pylint: disable=g-import-not-at-top
  if not verbose:
    cli.hide_orbax_logs()
  created = not os.path.exists(_WORKDIR.value)
  try:  # Before any data is read or anything compiles.
    workdir = outputs.check_workdir(_WORKDIR.value)
  except (OSError, ImportError, ValueError) as e:  # ImportError: gs:// without the gcs extra.
    cli.error('train.py', e)
    return cli.EXIT_USAGE
  try:
    return _train(workdir, verbose)
  finally:
    # A start that failed before its first step leaves the workdir as it found it (the trainer
    # removes what it wrote); the folder itself, if this command created it.
    if created and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)


def _train(workdir: str, verbose: bool) -> int:
  from repmlp_jax.commands import cli  # pylint: disable=g-import-not-at-top
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
    if verbose:
      raise  # Asked for detail: the whole traceback.
    cli.error('train.py', e)
    return cli.exit_status(e)
  # The trainer has printed the last line: where the results are, or how to resume.
  return cli.EXIT_STOPPED if result.get('preempted') else cli.EXIT_OK


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
