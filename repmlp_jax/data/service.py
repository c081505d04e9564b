"""tf.data service: run the training preprocessing on other machines' CPUs.

An accelerator training RepMLPNet-B224 consumes more images per second than one host's cores
decode and augment (benchmarks/README.md); the tf.data service moves that work to other CPU
machines: one dispatcher hands out work, workers run the preprocessing and stream the results
to the training processes. The commands are in README.md ("Input pipeline: how many cores,
and the tf.data service").

Workers read the data themselves, so `--config.data_dir` (tfds records or an image folder) must
be readable from every worker at the same path (a shared file system or gs://). Each training
process still reads only its own share: it registers the pipeline of its own slice, and the
dispatcher splits that slice among the workers (dynamic sharding: every example of an epoch is
processed exactly once, by whichever worker asks first). What changes and what does not is in
`input_pipeline.create_split` (`data_service_address`).
"""

import argparse
import socket
import sys

import tensorflow as tf

_service = tf.data.experimental.service


def start_dispatcher(port: int, *, work_dir: str | None = None) -> _service.DispatchServer:
  """Starts a dispatcher on this machine (returns at once; the server runs in the background).

  Args:
    port: port to listen on (0: any free port; read it from `server.target`).
    work_dir: optional directory where the dispatcher journals its state, so that a restarted
      dispatcher resumes the running jobs (fault-tolerant mode).

  Returns:
    The running server; `server.target` is the address to give workers and trainers.
  """
  config = _service.DispatcherConfig(port=port, work_dir=work_dir,
                                     fault_tolerant_mode=work_dir is not None)
  return _service.DispatchServer(config)


def start_worker(dispatcher_address: str, port: int, *,
                 worker_address: str | None = None) -> _service.WorkerServer:
  """Starts a worker that registers with the dispatcher (returns at once).

  Args:
    dispatcher_address: 'host:port' of the dispatcher (a 'grpc://' prefix is accepted).
    port: port the worker serves its results on (0: any free port).
    worker_address: 'host:port' the trainers use to reach this worker; '%port%' is replaced by
      the bound port. Default: this machine's host name (TensorFlow's own default, localhost,
      only works when the trainers run on this machine).
  """
  config = _service.WorkerConfig(
      dispatcher_address=dispatcher_address.removeprefix('grpc://'), port=port,
      worker_address=worker_address or f'{socket.gethostname()}:%port%')
  return _service.WorkerServer(config)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m repmlp_jax.data.service',
      description='Run a tf.data service dispatcher or worker for train.py '
                  '(--config.data_service_address=grpc://<dispatcher host>:<port>).')
  roles = parser.add_subparsers(dest='role', required=True)
  dispatcher = roles.add_parser('dispatcher', help='the one process that hands out work')
  dispatcher.add_argument('--port', type=int, default=5050)
  dispatcher.add_argument('--work_dir', default=None,
                          help='journal directory: a restarted dispatcher resumes its jobs')
  worker = roles.add_parser('worker', help='a process that preprocesses data (one per machine)')
  worker.add_argument('--dispatcher', required=True, help='host:port of the dispatcher')
  worker.add_argument('--port', type=int, default=5051)
  worker.add_argument('--worker_address', default=None,
                      help="host:port trainers use to reach this worker "
                           "(default: this host's name and --port)")
  return parser


def main(argv: list[str] | None = None) -> None:
  """Command line: start a dispatcher or a worker and serve until killed."""
  args = _parser().parse_args(argv)
  tf.config.set_visible_devices([], 'GPU')  # The preprocessing runs on CPUs; leave GPUs alone.
  if args.role == 'dispatcher':
    server = start_dispatcher(args.port, work_dir=args.work_dir)
    print(f'tf.data service dispatcher serving at {server.target}.', flush=True)
  else:
    server = start_worker(args.dispatcher, args.port, worker_address=args.worker_address)
    print(f'tf.data service worker serving on port {args.port}.', flush=True)
  server.join()


if __name__ == '__main__':
  main(sys.argv[1:])
