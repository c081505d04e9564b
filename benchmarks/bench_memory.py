"""Memory passes of RepMLPNet's forward, as XLA counts them: bytes accessed and layout ops.

    python -m benchmarks.bench_memory                       # B224, batch 8, float32, CPU
    python -m benchmarks.bench_memory --models b224 t224 --batch 8 --json memory.json
    python -m benchmarks.bench_memory --breakdown 15          # where the bytes go, by kind and op

For the training-form forward (eval-mode BatchNorm) and the deploy-form forward of each variant:
XLA's cost analysis of the compiled program (`bytes accessed` and `flops`, per image) and the
number of `transpose` and `copy` instructions in the optimized HLO (`compiled.as_text()`, fusion
bodies included: each is a layout change XLA could not fold into a reshape or a dot). Nothing
is run, only compiled, so the figures do not depend on the machine's load. On GPU the cost
analysis leaves out cuBLAS/cuDNN custom calls: the figures are a CPU proxy.

`--breakdown N` splits the bytes by the top-level instructions of the optimized program (each
instruction's operands and result, as the cost analysis counts them) into kinds: matmul (an
instruction made from a dot_general: its input, weights and output), layout (a copy or a
transpose on its own), element-wise (everything else: bias, GELU, BatchNorm, gates, residuals,
pooling) and, in TPU programs, async move (between HBM and on-chip memory) and collective,
then lists the N largest groups (one group = one op of one stage). The same split of a TPU
program: benchmarks/bench_tpu_memory.py.
"""

import argparse
import collections
import json
import math
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

import repmlp_jax
from repmlp_jax.models import factory as models
from repmlp_jax.tpu import hlo


_DTYPE_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 'pred': 1, 's8': 1,
                'u8': 1}
# Parentheses nested up to three deep: tuple shapes and operand lists hold TPU layouts such as
# `{3,2,1,0:T(8,128)(2,1)}`.
_PARENS = r'\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)'
_INSTRUCTION = re.compile(rf'\s*(?:ROOT )?%(\S+) = ({_PARENS}|\S+) ([\w-]+)({_PARENS})(.*)')
_FREE = ('parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element')
_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')


_ARRAY = re.compile(r'(\w+)\[([\d,]*)\](?:\{([\d,]*)(?::([^}]*))?\})?')


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape such as `f32[8,56,56,96]{3,2,1,0}` (tuples: the sum).

  A TPU layout's tile, `{3,2,1,0:T(8,128)}`, pads the most minor dimensions up to its sizes (a
  minor dimension of 4 takes 128 lanes): the bytes are those of the padded array.
  """
  total = 0
  for dtype, dims, minor_to_major, tiling in _ARRAY.findall(shape):
    sizes = [int(d) for d in dims.split(',') if d]
    tile = re.match(r'T\(([\d,]+)\)', tiling)
    if tile and minor_to_major:
      tile_sizes = [int(t) for t in tile.group(1).split(',')]
      for size, axis in zip(reversed(tile_sizes), (int(a) for a in minor_to_major.split(','))):
        sizes[axis] = -(-sizes[axis] // size) * size
    total += _DTYPE_BYTES.get(dtype, 4) * math.prod(sizes)
  return total


def _kind(name: str, op: str, op_name: str) -> str:
  if op.removesuffix('-start') in _COLLECTIVES:
    return 'collective'
  if op.endswith('-start'):
    return 'async move'
  if 'dot_general' in op_name or op in ('dot', 'convolution'):
    return 'matmul'
  if op in ('copy', 'transpose') or name.startswith(('copy', 'transpose')):
    return 'layout'
  return 'element-wise'


def breakdown(hlo_text: str, batch: int) -> dict[str, Any]:
  """Bytes per image by kind and by (stage, op) over the entry computation's instructions.

  Each instruction counts its result and its operands once, as XLA's cost analysis does for a
  fusion; parameters, constants, bitcasts and tuples move nothing. An asynchronous pair
  (`copy-start` / `copy-done`, TPU's moves between HBM and on-chip memory; collectives) counts
  at its start, its operands read and written once.

  Args:
    hlo_text: `compiled.as_text()` of a program without loops.
    batch: images per call.
  Returns:
    {'kinds': {kind: bytes per image}, 'groups': [(bytes per image, count, kind, label)] largest
    first}.
  """
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  sizes, kinds = {}, collections.Counter()
  groups, counts = collections.Counter(), collections.Counter()
  for line in entry.splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, op, operands, rest = match.groups()
    sizes[name] = _shape_bytes(shape)
    if op in _FREE or op.endswith('-done'):
      continue
    read = sum(sizes.get(o, 0) for o in re.findall(r'%([\w.-]+)', operands))
    moved = 2 * read if op.endswith('-start') else sizes[name] + read
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else name
    kind = _kind(name, op, op_name)
    # One group per op of a stage (units of a stage share their label), without the model name.
    label = re.sub(r'^jit\([^)]*\)/([A-Z]\w*/)?', '', re.sub(r'(stages_\d+)_\d+', r'\1', op_name))
    kinds[kind] += moved / batch
    groups[(kind, label)] += moved / batch
    counts[(kind, label)] += 1
  return {'kinds': dict(kinds),
          'groups': [(b, counts[k], *k) for k, b in groups.most_common()]}


def measure(model, batch: int, dtype=jnp.float32, breakdown_of: bool = False) -> dict[str, Any]:
  """XLA's figures for `model`'s eval forward at `batch` (variables abstract, nothing run).

  Args:
    model: a RepMLPNet (either form).
    batch: images per call.
    dtype: the input's dtype.
    breakdown_of: also split the bytes by kind and op (`breakdown`).
  Returns:
    {'bytes_per_image', 'flops_per_image', 'transpose', 'copy'} (and 'breakdown').
  """
  size = model.image_size or model.input_multiple
  x = jax.ShapeDtypeStruct((batch, size, size, 3), dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one dict per device.
  text = compiled.as_text()
  result = {'bytes_per_image': cost['bytes accessed'] / batch,
            'flops_per_image': cost['flops'] / batch, **hlo.count_ops(text)}
  if breakdown_of:
    result['breakdown'] = breakdown(text, batch)
  return result


def run(model_names, batch: int, breakdown_of: bool = False) -> dict[str, Any]:
  """Both forms of every variant; a JSON-able dict."""
  results = {'device': str(jax.devices()[0]), 'jax': jax.__version__, 'batch': batch, 'cases': []}
  for name in model_names:
    model = repmlp_jax.create_model(name)
    for form, m in (('train_fwd', model), ('deploy_fwd', model.clone(deploy=True))):
      results['cases'].append({'model': models.resolve_name(name), 'form': form,
                               **measure(m, batch, breakdown_of=breakdown_of)})
  return results


def format_table(results: dict[str, Any]) -> str:
  lines = [f"device {results['device']}, jax {results['jax']}, batch {results['batch']}, float32"]
  header = f"{'model':16} {'form':10} {'MB/image':>9} {'GFLOP/image':>11} {'transposes':>10} {'copies':>6}"
  lines += [header, '-' * len(header)]
  for c in results['cases']:
    lines.append(f"{c['model']:16} {c['form']:10} {c['bytes_per_image'] / 1e6:9.1f} "
                 f"{c['flops_per_image'] / 1e9:11.2f} {c['transpose']:10d} {c['copy']:6d}")
  return '\n'.join(lines)


def format_breakdown(results: dict[str, Any], top: int) -> str:
  """Per case: MB per image by kind, then the `top` largest (stage, op) groups."""
  lines = []
  for c in results['cases']:
    b = c['breakdown']
    kinds = ', '.join(f'{k} {v / 1e6:.1f}' for k, v in sorted(b['kinds'].items()))
    lines += ['', f"{c['model']} {c['form']}: {sum(b['kinds'].values()) / 1e6:.1f} MB/image "
              f"counted by instruction ({kinds})",
              f"{'MB/image':>9} {'count':>5}  {'kind':12} op"]
    lines += [f'{v / 1e6:9.1f} {n:5d}  {kind:12} {label}' for v, n, kind, label in b['groups'][:top]]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['RepMLPNet-B224'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  parser.add_argument('--breakdown', type=int, default=0, metavar='N',
                      help='also split the bytes by kind and list the N largest ops per case')
  args = parser.parse_args(argv)
  results = run(args.models, args.batch, breakdown_of=args.breakdown > 0)
  print(format_table(results))
  if args.breakdown:
    print(format_breakdown(results, args.breakdown))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
