"""Deploy-form inference: onnxruntime (CPU) on the exported ONNX file next to the jitted JAX model.

    python -m benchmarks.bench_onnx                                  # B224, batch 1 and 8
    python -m benchmarks.bench_onnx --models t224 --batch-sizes 8 --repeats 7

For each variant: the deploy form (random weights: speed does not depend on their values) is
exported once with `repmlp_jax.export_onnx` (dynamic batch), then each batch size runs in JAX and
in an onnxruntime CPU session with as many intra-op threads as the cores JAX uses. Timing as in
bench_models: warm-up, then the repeats round-robin over both runtimes (load from other processes
hits both alike); figures are medians. Also the export time and the relative difference of the
two runtimes' logits.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import repmlp_jax
from benchmarks import bench_models
from repmlp_jax.inference import onnx_export
from repmlp_jax.reparameterize import deploy as reparameterize


def run(name: str, batch_sizes: list[int], *, repeats: int, warmup: int) -> list[str]:
  """Times one variant; returns the table's lines."""
  threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  model = repmlp_jax.create_model(name)
  size = model.image_size
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  deploy_model, deploy_variables = reparameterize.reparam(model, variables)
  forward = jax.jit(lambda v, x: deploy_model.apply(v, x, train=False))
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.onnx')
    start = time.perf_counter()
    repmlp_jax.export_onnx(deploy_model, deploy_variables, path)
    export_s = time.perf_counter() - start
    mib = os.path.getsize(path) / 2**20
    session = onnx_export.onnxruntime_session(path, threads=threads)
    for batch in batch_sizes:
      x = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)
      jax_logits = np.asarray(forward(deploy_variables, x))
      ort_logits = onnx_export.run_onnx(session, x)
      difference = np.abs(ort_logits - jax_logits).max() / np.abs(jax_logits).max()
      seconds = bench_models.time_round_robin({
          'jax': lambda: forward(deploy_variables, x).block_until_ready(),
          'onnxruntime': lambda: onnx_export.run_onnx(session, x),
      }, repeats, warmup)
      lines.append(f'{name:15s} {batch:5d} {batch / seconds["jax"]:10.2f} '
                   f'{batch / seconds["onnxruntime"]:12.2f} '
                   f'{seconds["onnxruntime"] / seconds["jax"]:9.2f} {difference:10.1e}')
  lines.append(f'{"":15s} export {export_s:.1f} s, {mib:.0f} MiB, {threads} threads, '
               f'jax {jax.__version__}, onnxruntime {_ort_version()}')
  return lines


def _ort_version() -> str:
  import onnxruntime  # pylint: disable=g-import-not-at-top
  return onnxruntime.__version__


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['RepMLPNet-B224'])
  parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per runtime (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls before timing')
  args = parser.parse_args(argv)
  print(f'{"model":15s} {"batch":>5s} {"jax img/s":>10s} {"ort img/s":>12s} {"jax/ort":>9s} '
        f'{"rel diff":>10s}')
  for name in args.models:
    print('\n'.join(run(repmlp_jax.resolve_name(name), args.batch_sizes, repeats=args.repeats,
                        warmup=args.warmup)), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
