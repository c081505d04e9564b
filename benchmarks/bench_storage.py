"""Save and restore time of RepMLPNet-B224 checkpoints: the local disk against a gs:// bucket.

    python benchmarks/bench_storage.py [--model b224] [--repeats 2]

The bucket is the storage emulator of the tests (tests/gcs_emulator.py, on 127.0.0.1, in a
loopback-only network namespace when run as root): it measures the package's and orbax's work
and the HTTP round trips, not a real bucket's network. Two checkpoints: the model's variables
(`model_io.save_model` / `load_model`, float32, what convert.py and train.py's deploy/ write) and
a training state as train.py checkpoints it (`train.checkpointing`: params, BatchNorm
statistics and AdamW's two moments). Each measurement runs in its own process (the same for both
places); the figures are the best of --repeats.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _arrays(model_name: str):
  """The model and random float32 variables of its shapes (initialising B224 takes minutes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import repmlp_jax  # pylint: disable=g-import-not-at-top
  from repmlp_jax import model_io  # pylint: disable=g-import-not-at-top
  model = repmlp_jax.create_model(model_name)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                           model_io.abstract_variables(model))
  return model, variables


def measure(model_name: str, where: str, repeats: int) -> dict:
  """Times each save and restore to `where` (a local folder or a gs:// URL)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from repmlp_jax import model_io  # pylint: disable=g-import-not-at-top
  from repmlp_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  model, variables = _arrays(model_name)
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': {'mu': variables['params'], 'nu': variables['params']},
           'step': np.int32(1)}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                         sharding=sharding), state)
  size = lambda tree: sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))
  times = {'variables_save': [], 'variables_restore': [], 'state_save': [], 'state_restore': []}
  for i in range(repeats):
    path = f'{where}/model_{i}'
    start = time.perf_counter()
    model_io.save_model(path, model, variables)
    times['variables_save'].append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(model_io.load_model(path)[1])
    times['variables_restore'].append(time.perf_counter() - start)
    checkpoints = checkpointing.Checkpoints(f'{where}/checkpoints_{i}')
    start = time.perf_counter()
    checkpoints.save(1, state)
    times['state_save'].append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(checkpoints.restore(abstract, 1))
    times['state_restore'].append(time.perf_counter() - start)
    checkpoints.close()
  return {'variables_mb': size(variables) / 1e6, 'state_mb': size(state) / 1e6,
          **{k: min(v) for k, v in times.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--model', default='b224')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--measure', help=argparse.SUPPRESS)  # The worker: a folder or a URL.
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.model, args.measure, args.repeats)))
    return
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  results = {}
  with tempfile.TemporaryDirectory(prefix='bench-storage-') as tmp:
    with gcs_emulator.Emulator(os.path.join(tmp, 'bucket')) as emulator:
      for name, where in (('local disk', os.path.join(tmp, 'local')),
                          ('gs:// emulator', emulator.url('bench'))):
        code, out = emulator.run([sys.executable, os.path.abspath(__file__), '--model',
                                  args.model, '--repeats', str(args.repeats), '--measure', where],
                                 timeout=3600)
        if code:
          raise SystemExit(out[-3000:])
        results[name] = json.loads(out.strip().splitlines()[-1])
  first = next(iter(results.values()))
  print(f'{args.model}: variables {first["variables_mb"]:.0f} MB, training state '
        f'{first["state_mb"]:.0f} MB (float32); best of {args.repeats}, seconds')
  print(f'{"":16} {"vars save":>10} {"vars restore":>13} {"state save":>11} '
        f'{"state restore":>14}')
  for name, r in results.items():
    print(f'{name:16} {r["variables_save"]:10.2f} {r["variables_restore"]:13.2f} '
          f'{r["state_save"]:11.2f} {r["state_restore"]:14.2f}')


if __name__ == '__main__':
  main()
