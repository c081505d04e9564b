"""Memory passes of RepMLPNet's forward, as XLA counts them: bytes accessed and layout ops.

    python -m benchmarks.bench_memory                       # B224, batch 8, float32, CPU
    python -m benchmarks.bench_memory --models b224 t224 --batch 8 --json memory.json

For the training-form forward (eval-mode BatchNorm) and the deploy-form forward of each variant:
XLA's cost analysis of the compiled program (`bytes accessed` and `flops`, per image) and the
number of `transpose` and `copy` instructions in the optimized HLO (`compiled.as_text()`, fusion
bodies included: each is a layout change XLA could not fold into a reshape or a dot). Nothing
is run, only compiled, so the figures do not depend on the machine's load. On GPU the cost
analysis leaves out cuBLAS/cuDNN custom calls: the figures are a CPU proxy.
"""

import argparse
import json
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

import repmlp_jax
from repmlp_jax.models import factory as models


def count_ops(hlo_text: str) -> dict[str, int]:
  """Transposes and copies among the instructions of an optimized HLO module's text."""
  counts = {'transpose': 0, 'copy': 0}
  for op in re.findall(r'=\s*\S+\s+(transpose|copy)\(', hlo_text):
    counts[op] += 1
  return counts


def measure(model, batch: int, dtype=jnp.float32) -> dict[str, Any]:
  """XLA's figures for `model`'s eval forward at `batch` (variables abstract, nothing run).

  Args:
    model: a RepMLPNet (either form).
    batch: images per call.
    dtype: the input's dtype.
  Returns:
    {'bytes_per_image', 'flops_per_image', 'transpose', 'copy'}.
  """
  size = model.image_size or model.input_multiple
  x = jax.ShapeDtypeStruct((batch, size, size, 3), dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one dict per device.
  return {'bytes_per_image': cost['bytes accessed'] / batch, 'flops_per_image': cost['flops'] / batch,
          **count_ops(compiled.as_text())}


def run(model_names, batch: int) -> dict[str, Any]:
  """Both forms of every variant; a JSON-able dict."""
  results = {'device': str(jax.devices()[0]), 'jax': jax.__version__, 'batch': batch, 'cases': []}
  for name in model_names:
    model = repmlp_jax.create_model(name)
    for form, m in (('train_fwd', model), ('deploy_fwd', model.clone(deploy=True))):
      results['cases'].append({'model': models.resolve_name(name), 'form': form,
                               **measure(m, batch)})
  return results


def format_table(results: dict[str, Any]) -> str:
  lines = [f"device {results['device']}, jax {results['jax']}, batch {results['batch']}, float32"]
  header = f"{'model':16} {'form':10} {'MB/image':>9} {'GFLOP/image':>11} {'transposes':>10} {'copies':>6}"
  lines += [header, '-' * len(header)]
  for c in results['cases']:
    lines.append(f"{c['model']:16} {c['form']:10} {c['bytes_per_image'] / 1e6:9.1f} "
                 f"{c['flops_per_image'] / 1e9:11.2f} {c['transpose']:10d} {c['copy']:6d}")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['RepMLPNet-B224'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  args = parser.parse_args(argv)
  results = run(args.models, args.batch)
  print(format_table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
