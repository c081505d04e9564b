"""One-shot accelerator benchmark of RepMLPNet-B224: JAX against the authors' PyTorch code.

    python -m benchmarks.gpu_b224 --out-dir results/          # on a machine with one GPU

Measures, each framework in its own process (`bench_models.run_in_processes`), every precision
(JAX float32 at default precision and bfloat16; PyTorch float32, TF32 and bfloat16 autocast):
both forms at batch 256, the deploy form at batch 1 (latency) and the training step at batch
128; with the matmul rate of each precision, the MFU, compile time and peak device memory.
Writes `gpu_b224.json` and `gpu_b224.md` (a markdown table) into --out-dir. Sized for about
five minutes of an H100/H200-class GPU, compiles included. `--device cpu --model
_RepMLPNet-Tiny --batches 2 1 0` runs the same path on CPU in seconds (the test suite does; a
batch of 0 leaves that part out).
"""

import argparse
import json
import os
import sys

from benchmarks import bench_models

PRECISIONS = ('float32', 'tf32', 'bfloat16')


def plan(model: str, batches: tuple[int, int, int]):
  """(model, batch, whats): throughput of both forms, deploy latency, the training step.

  A batch of 0 leaves its part out.
  """
  parts = zip(batches, (('deploy_fwd', 'train_fwd'), ('deploy_fwd',), ('train_step',)))
  return [(model, batch, whats) for batch, whats in parts if batch > 0]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out-dir', default='.')
  parser.add_argument('--device', choices=('cpu', 'gpu'), default='gpu')
  parser.add_argument('--model', default='RepMLPNet-B224')
  parser.add_argument('--batches', nargs=3, type=int, default=[256, 1, 128],
                      metavar=('THROUGHPUT', 'LATENCY', 'TRAIN'))
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--matmul-size', type=int, default=8192)
  parser.add_argument('--precisions', nargs='+', default=list(PRECISIONS), choices=PRECISIONS)
  parser.add_argument('--no-torch', action='store_true', help='JAX figures only')
  args = parser.parse_args(argv)
  frameworks = ('jax',) if args.no_torch else bench_models.FRAMEWORKS
  rows = bench_models.run_in_processes(
      plan(args.model, tuple(args.batches)), args.precisions, device=args.device,
      frameworks=frameworks, repeats=args.repeats, warmup=args.warmup,
      matmul_size=args.matmul_size)
  results = {'environment': bench_models.environment(args.device), 'rows': rows,
             'command': 'python -m benchmarks.gpu_b224 ' + ' '.join(
                 sys.argv[1:] if argv is None else argv)}
  os.makedirs(args.out_dir, exist_ok=True)
  table = bench_models.format_table(results)
  with open(os.path.join(args.out_dir, 'gpu_b224.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out_dir, 'gpu_b224.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
