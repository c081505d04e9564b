"""Where the compile time of a RepMLPNet training step goes, part by part (JAX, CPU or any backend).

    python -m benchmarks.bench_compile                           # RepMLPNet-B224, float32, batch 8
    python -m benchmarks.bench_compile --repeats 5 --out compile.json
    python -m benchmarks.bench_compile --model t224 --dtype bfloat16

The training step is the one `benchmarks/bench_models.py` times (forward, backward, AdamW,
train-mode BatchNorm; `jax.jit(step, donate_argnums=0).lower(state, x, labels).compile()`, the
variables drawn with numpy as there). It is compiled whole and in parts:

- `train_step`: the whole step.
- `gradients`: the forward and backward alone (gradients and new BatchNorm statistics).
- `optimizer`: the AdamW update alone (`tx.update` + `apply_updates`) on the model's parameter
  tree, parameters and optimizer state donated as in the step.
- `optimizer_recipe`: the same for train.py's optimizer (`repmlp_jax.train.optim`: grad-norm
  clipping, AdamW with the weight-decay mask and a learning-rate schedule).
- `experiment_step`: train.py's whole step (`repmlp_jax.train.experiment.Experiment.train_step`
  with configs/common.py's settings for this model, dtype and batch on every local device: mixup
  and CutMix, label smoothing, the optimizer above, the logged norms), lowered on the abstract
  state.
- `fixed`: a one-operation program: what any compile costs in a fresh process.
- `unit_<i>`: the gradient of one RepMLPNet unit (its parameters and its input, train-mode
  BatchNorm) for each distinct unit (settings and input shape) of the model; the table gives how
  many units of the model share it.

For each part: trace + lower seconds, XLA compile seconds (wall and the process's CPU time, all
threads), and the number of fusions in the optimized program. Each measurement runs in a fresh
Python process (nothing compiled earlier in the process, no persistent compilation cache), the
parts round-robin within each repeat so that load from other processes falls on all alike;
the table gives the minimum and the median over the repeats. The sums the parts predict, each
part counted net of `fixed` and `fixed` once: the units times their counts (against
`gradients`), and that plus `optimizer` (against `train_step`); the units leave out the stem,
the downsampling convs and the head.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import repmlp_jax
from benchmarks import bench_models
from repmlp_jax.models import factory as models
from repmlp_jax.models import layers
from repmlp_jax.train import optim

FIGURES = ('lower_s', 'compile_s', 'compile_cpu_s', 'fusions')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _setup(name: str, dtype: str, batch: int):
  model = repmlp_jax.create_model(name, dtype=DTYPES[dtype])
  size = model.image_size or model.input_multiple
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
  labels = jnp.arange(batch) % model.num_classes
  return model, x, labels


def distinct_units(model: nn.Module, x: jax.Array) -> list[dict[str, Any]]:
  """The model's RepMLPNet units grouped by settings and input: one entry per group.

  Returns:
    [{'module': an unbound unit, 'path': the first unit's variable path, 'input': its input's
    ShapeDtypeStruct, 'names': every unit of the group}], in the order the model calls them.
  """
  groups: dict[Any, dict[str, Any]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, layers.RepMLPNetUnit) and context.method_name == '__call__':
      unbound = module.clone(parent=None, name=None)
      key = (repr(unbound), args[0].shape, str(args[0].dtype))
      groups.setdefault(key, {'module': unbound, 'path': module.scope.path,
                              'input': jax.ShapeDtypeStruct(args[0].shape, args[0].dtype),
                              'names': []})['names'].append('/'.join(module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    # In training mode: the units' inputs as the training step feeds them.
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True), x)
  return list(groups.values())


def _unit_gradients(unit: nn.Module) -> Callable[..., Any]:
  """(params, batch_stats, x, cotangent) -> (gradients of params and x, new batch_stats)."""
  def grads(params, batch_stats, x, cotangent):
    def loss(params, x):
      y, updates = unit.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.vdot(y, cotangent.astype(y.dtype)).astype(jnp.float32), updates['batch_stats']
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return grads


def _recipe_optimizer() -> optax.GradientTransformation:
  """train.py's optimizer with configs/common.py's AdamW settings (clipping, decay mask)."""
  config = ml_collections.ConfigDict(dict(
      optimizer='adamw', base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, global_batch_size=256,
      lr_reference_batch=256, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.1,
      grad_clip_norm=5.0))
  schedule = optim.learning_rate_schedule(config, total_steps=1000, warmup_steps=100)
  return optim.create_optimizer(config, schedule)


def _optimizer_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  def update(params, opt_state, grads):
    step, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, step), opt_state
  return update


def part_names(name: str, dtype: str = 'float32', batch: int = 8) -> list[str]:
  """Every part of the model's step that `measure` compiles."""
  model, x, _ = _setup(name, dtype, batch)
  units = [f'unit_{i}' for i in range(len(distinct_units(model, x)))]
  return ['train_step', 'gradients', 'optimizer', 'optimizer_recipe', 'experiment_step',
          'fixed', *units]


def _experiment_step(name: str, dtype: str, batch: int):
  """train.py's jitted step for the model and its abstract (state, batch) arguments."""
  from configs import common  # The repository's configs: importable from its root only.
  from repmlp_jax.train import experiment
  config = common.get_config()
  model = repmlp_jax.create_model(name)
  size = model.image_size or model.input_multiple
  config.model, config.dtype, config.global_batch_size = name, dtype, batch
  config.image_size = config.eval_image_size = size
  config.num_train_steps = 1000
  steps = experiment.derive_steps(config, num_train_examples=1000 * batch)
  exp = experiment.Experiment(config, num_classes=model.num_classes, steps=steps)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=exp.batch_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=exp.batch_sharding)
  return exp.train_step, (exp.abstract_state, {'image': images, 'label': labels})


def _part(name: str, dtype: str, batch: int, part: str):
  """(jitted function, its arguments, extra figures) of one part."""
  if part == 'experiment_step':
    return (*_experiment_step(name, dtype, batch), {})
  if part == 'fixed':
    return jax.jit(lambda a: a + 1), (jnp.zeros(8, jnp.float32),), {}
  model, x, labels = _setup(name, dtype, batch)
  variables = bench_models.random_variables(model, x)
  if part == 'train_step':
    tx = bench_models.adamw()
    return (jax.jit(bench_models.make_train_step(model, tx), donate_argnums=0),
            (bench_models.train_state(variables, tx), x, labels), {})
  if part == 'gradients':
    fn = lambda p, s, x, labels: bench_models.model_gradients(model, p, s, x, labels)
    return jax.jit(fn), (variables['params'], variables['batch_stats'], x, labels), {}
  if part in ('optimizer', 'optimizer_recipe'):
    tx = bench_models.adamw() if part == 'optimizer' else _recipe_optimizer()
    params = variables['params']
    return (jax.jit(_optimizer_step(tx), donate_argnums=(0, 1)),
            (params, tx.init(params), jax.tree.map(jnp.ones_like, params)), {})
  groups = distinct_units(model, x)
  if not part.startswith('unit_') or part[len('unit_'):] not in map(str, range(len(groups))):
    raise ValueError(f'Unknown part {part!r}; choose from {part_names(name, dtype, batch)}.')
  group = groups[int(part[len('unit_'):])]

  def at(tree):
    for key in group['path']:
      tree = tree[key]
    return tree

  shape = group['input'].shape
  args = (at(variables['params']), at(variables['batch_stats']),
          jnp.ones(shape, group['input'].dtype), jnp.ones(shape, jnp.float32))
  return (jax.jit(_unit_gradients(group['module'])), args,
          {'units': len(group['names']), 'input_shape': list(shape), 'names': group['names']})


def measure(name: str, dtype: str, batch: int, part: str) -> dict[str, Any]:
  """Lowers and compiles one part in this process; its figures.

  Args:
    name: model name (create_model's).
    dtype: 'float32' or 'bfloat16' (the compute dtype; parameters stay float32).
    batch: images per step.
    part: one of part_names(...).
  Returns:
    {'part', 'lower_s', 'compile_s', 'compile_cpu_s', 'fusions'} (+ 'units', 'input_shape',
    'names' for a unit).
  """
  jitted, args, extra = _part(name, dtype, batch, part)
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at, cpu_at = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  figures = {'part': part, 'lower_s': lowered_at - start,
             'compile_s': time.perf_counter() - lowered_at,
             'compile_cpu_s': time.process_time() - cpu_at,
             'fusions': compiled.as_text().count(' fusion(')}
  return {**figures, **extra}


def _measure_in_fresh_process(name: str, dtype: str, batch: int, part: str) -> dict[str, Any]:
  spec = {'model': name, 'dtype': dtype, 'batch': batch, 'part': part}
  done = bench_models.run_worker('benchmarks.bench_compile', spec, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def _load_average() -> float | None:
  return os.getloadavg()[0] if hasattr(os, 'getloadavg') else None


def run(name: str = 'RepMLPNet-B224', *, dtype: str = 'float32', batch: int = 8,
        repeats: int = 3, parts: list[str] | None = None,
        fresh_processes: bool = True) -> dict[str, Any]:
  """Measures every part `repeats` times; the raw figures and their summary.

  Args:
    name, dtype, batch: the step's model, compute dtype and batch size.
    repeats: measurements per part (each in a fresh process).
    parts: default every part (part_names).
    fresh_processes: False measures in this process (quick checks only: what compiled before
      in the process, and its warm-up, colour the figures).
  Returns:
    {'model', 'dtype', 'batch', 'environment', 'runs': every measurement, 'parts': min and
    median per part and figure, 'predicted': the sums the parts predict}.
  """
  known = part_names(name, dtype, batch)
  parts = parts or known
  unknown = [p for p in parts if p not in known]
  if unknown:  # Before any process starts.
    raise ValueError(f'Unknown part(s) {unknown} of {name}; choose from {known}.')
  one = _measure_in_fresh_process if fresh_processes else measure
  runs = []
  for repeat in range(repeats):
    for part in parts:  # Round-robin: load from other processes falls on every part alike.
      load = _load_average()
      print(f'repeat {repeat + 1}/{repeats}: {part} (load {load})', file=sys.stderr, flush=True)
      runs.append({**one(name, dtype, batch, part), 'repeat': repeat, 'load_average': load})
  summary = {}
  for part in parts:
    mine = [r for r in runs if r['part'] == part]
    summary[part] = {f: {'min': min(r[f] for r in mine),
                         'median': statistics.median(r[f] for r in mine)} for f in FIGURES}
    summary[part]['count'] = mine[0].get('units', 1)
    if 'input_shape' in mine[0]:
      summary[part]['input_shape'] = mine[0]['input_shape']
  return {'model': models.resolve_name(name), 'dtype': dtype, 'batch': batch,
          'environment': {'jax': jax.__version__, 'backend': jax.default_backend(),
                          'cpu_threads': bench_models._cpu_threads(),
                          'fresh_processes': fresh_processes},
          'runs': runs, 'parts': summary, 'predicted': predicted(summary)}


def predicted(summary: dict[str, Any]) -> dict[str, Any]:
  """Per figure and statistic: units x counts ('units'), plus the optimizer ('units_optimizer').

  Each part counts net of the `fixed` part (when measured), which is counted once.
  """
  units = [p for p in summary if p.startswith('unit_')]
  out = {}
  if not units:
    return out
  for stat in ('min', 'median'):
    for f in FIGURES:
      fixed = summary['fixed'][f][stat] if 'fixed' in summary else 0.0
      total = fixed + sum((summary[p][f][stat] - fixed) * summary[p]['count'] for p in units)
      out.setdefault('units', {}).setdefault(f, {})[stat] = total
      if 'optimizer' in summary:
        out.setdefault('units_optimizer', {}).setdefault(f, {})[stat] = (
            total + summary['optimizer'][f][stat] - fixed)
  return out


def format_table(results: dict[str, Any]) -> str:
  """A markdown table: per part and for the predicted sums, min / median of each figure."""
  env = results['environment']
  loads = [r['load_average'] for r in results['runs'] if r['load_average'] is not None]
  lines = [f"{results['model']}, {results['dtype']}, batch {results['batch']}; jax {env['jax']} "
           f"{env['backend']}, {env['cpu_threads']} CPU threads; load average "
           f"{min(loads, default=float('nan')):.1f}-{max(loads, default=float('nan')):.1f}; "
           'min / median of the repeats', '',
           '| part | x count | lower s | compile s | compile CPU s | fusions |',
           '|---|---|---|---|---|---|']

  def row(label, count, figures):
    cells = [f"{figures[f]['min']:.2f} / {figures[f]['median']:.2f}" if f != 'fusions' else
             f"{figures[f]['min']:.0f}" for f in FIGURES]
    lines.append(f"| {label} | {count} | {' | '.join(cells)} |")

  for part, s in results['parts'].items():
    label = f"{part} {tuple(s['input_shape'])}" if 'input_shape' in s else part
    row(label, s['count'], s)
  labels = {'units': 'sum: units x count', 'units_optimizer': 'sum: units x count + optimizer'}
  for key, figures in results['predicted'].items():
    row(labels[key], '', figures)
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='RepMLPNet-B224')
  parser.add_argument('--dtype', choices=tuple(DTYPES), default='float32')
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3, help='fresh-process measurements per part')
  parser.add_argument('--parts', nargs='+', default=None, help='default: every part')
  parser.add_argument('--in-process', action='store_true',
                      help='measure in this process (quick checks; figures are coloured)')
  parser.add_argument('--out', default=None, help='also write the figures to this JSON file')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # One measurement.
  args = parser.parse_args(argv)
  if args.worker:
    # Every compile from scratch, even where JAX_COMPILATION_CACHE_DIR names a cache.
    jax.config.update('jax_enable_compilation_cache', False)
    spec = json.loads(args.worker)
    print(json.dumps(measure(spec['model'], spec['dtype'], spec['batch'], spec['part'])))
    return 0
  if args.batch_size < 1 or args.repeats < 1:
    parser.error('--batch-size and --repeats must be positive.')
  try:
    results = run(args.model, dtype=args.dtype, batch=args.batch_size, repeats=args.repeats,
                  parts=args.parts, fresh_processes=not args.in_process)
  except ValueError as e:  # An unknown model or part.
    parser.error(str(e))
  results['command'] = 'python -m benchmarks.bench_compile ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  print(format_table(results))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
