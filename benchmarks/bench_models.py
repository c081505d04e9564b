"""Speed of RepMLPNet in JAX and of the authors' PyTorch code: inference and training, CPU or GPU.

    python -m benchmarks.bench_models                          # CPU: B224, batch 1 and 8
    python -m benchmarks.bench_models --models b224 t224 --batch-sizes 8 --repeats 7 --json out.json
    python -m benchmarks.bench_models --device gpu --batch-sizes 256 --precisions float32 bfloat16

For each variant and batch size: images/s of (a) training-form inference, (b) deploy-form
inference, (c) one full training step (forward, backward, AdamW update, train-mode BatchNorm);
compile time (JAX: lower + compile), memory, the multiply-accumulates per image counted from the
layer shapes (`repmlp_jax.macs`) and the MFU: the model's FLOP rate (2 x MACs per image; a
training step counts 3 forwards) over the rate of a large matmul of the same dtype, timed in
the same run. The PyTorch reference is `tests/torch_reference.py` (the authors' model: training
form, the official deploy form from `.to_deploy()`, an AdamW step).

Precisions: 'float32' (JAX at the backend's default matmul precision, which is TF32 on recent
NVIDIA GPUs; PyTorch strict float32), 'tf32' (PyTorch with TF32 matmuls and convolutions; JAX
has no separate mode) and 'bfloat16' (JAX computing in bfloat16 with float32 parameters;
PyTorch under bfloat16 autocast).

CPU (default): every timed function, the matmul, JAX and PyTorch, is warmed up, then the repeats
run round-robin, so that load from other processes falls on every candidate alike. GPU: each
framework runs in its own process (`--framework` picks one; without it the two are started one
after the other and their figures merged), so neither framework's allocator or threads disturb
the other; within a process the repeats still run round-robin with that framework's matmul.
Figures are medians; every JAX call ends with block_until_ready, every CUDA call with a
synchronize. Memory: `xla_mib` is XLA's memory analysis of the compiled program (temporaries +
arguments + outputs - aliased); `peak_mib` is the peak device memory on GPU (JAX: the process's
peak so far; PyTorch: reset per case) and the peak growth of resident memory on CPU.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import repmlp_jax
from repmlp_jax import macs as macs_lib
from benchmarks import torch_cases
from repmlp_jax.models import factory as models
from repmlp_jax.reparameterize import deploy as reparameterize

WHATS = torch_cases.WHATS
FRAMEWORKS = ('jax', 'torch')
PRECISIONS = {'jax': ('float32', 'bfloat16'), 'torch': ('float32', 'tf32', 'bfloat16')}
JAX_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_rss_growth(fn: Callable[[], Any]) -> float:
  """Peak resident-memory growth (MiB) of the process while fn() runs (Linux)."""
  if not os.path.exists('/proc/self/statm'):
    return float('nan')
  base, peak, done = _rss_bytes(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(0.002)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    fn()
  finally:
    done.set()
    thread.join()
  return max(0, max(peak[0], _rss_bytes()) - base) / 2**20


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int) -> dict[str, float]:
  """Median seconds per call of each fn, the repeats interleaved across fns."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def xla_memory_mib(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float('nan')
  total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
  return (total - m.alias_size_in_bytes) / 2**20


def flops_per_image(name: str, what: str) -> tuple[int, float]:
  """(MACs, FLOPs) per image of `what`: 2 FLOPs per MAC; a training step counts 3 forwards."""
  model = repmlp_jax.create_model(name, deploy=what == 'deploy_fwd')
  macs = macs_lib.macs_per_image(model)
  return macs, 2.0 * macs * (3 if what == 'train_step' else 1)


def random_variables(model, x: jax.Array) -> dict[str, Any]:
  """Variables for timing, drawn with numpy (jit(model.init) compiles for minutes on CPU).

  Kernels ~ N(0, 1/fan_in) (fan_in: all but the last axis), BatchNorm scales and variances 1,
  every other vector 0: activations stay of order 1 through the network, as after init.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if leaf.ndim >= 2:
      value = rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def jax_matmul(size: int, precision: str) -> tuple[Callable[[], Any], float]:
  """A (size x size) @ (size x size) jnp.dot in `precision` on the default device; its FLOPs."""
  dtype = JAX_DTYPES[precision]
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  return (lambda: dot(a, b).block_until_ready()), 2.0 * size**3


class JaxCase:
  """Compiled JAX callables of one variant, batch size and precision, with their figures."""

  def __init__(self, name: str, batch: int, precision: str = 'float32',
               whats: Sequence[str] = WHATS):
    model = repmlp_jax.create_model(name, dtype=JAX_DTYPES[precision])
    size = model.image_size or model.input_multiple
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    labels = jnp.arange(batch) % model.num_classes
    variables = random_variables(model, x)
    self.stats: dict[str, float] = {}
    self.fns: dict[str, Callable[[], Any]] = {}

    def compile_(what, fn, *args, **jit_kwargs):
      start = time.perf_counter()
      compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
      self.stats[f'{what}_compile_s'] = time.perf_counter() - start
      self.stats[f'{what}_xla_mib'] = xla_memory_mib(compiled)
      return compiled

    if 'train_fwd' in whats:
      train_fwd = compile_('train_fwd', lambda v, x: model.apply(v, x, train=False), variables, x)
      self.fns['train_fwd'] = lambda: train_fwd(variables, x).block_until_ready()
    if 'deploy_fwd' in whats:
      reparam = compile_('reparam', functools.partial(reparameterize.reparam_variables, model),
                         variables)
      deploy_variables = jax.block_until_ready(reparam(variables))
      start = time.perf_counter()
      jax.block_until_ready(reparam(variables))
      self.stats['reparam_s'] = time.perf_counter() - start
      deploy_model = model.clone(deploy=True)
      deploy_fwd = compile_('deploy_fwd', lambda v, x: deploy_model.apply(v, x, train=False),
                            deploy_variables, x)
      self.fns['deploy_fwd'] = lambda: deploy_fwd(deploy_variables, x).block_until_ready()
    if 'train_step' in whats:
      self._add_train_step(model, variables, x, labels, compile_)

  def _add_train_step(self, model, variables, x, labels, compile_) -> None:
    tx = adamw()
    # Own copies: the step donates its state, the inference functions keep `variables`.
    state = train_state(jax.tree.map(jnp.copy, variables), tx)
    step = compile_('train_step', make_train_step(model, tx), state, x, labels, donate_argnums=0)
    self._state = state

    def run_step():
      self._state = jax.block_until_ready(step(self._state, x, labels))

    self.fns['train_step'] = run_step


def adamw() -> optax.GradientTransformation:
  """The optimizer of the timed training step: plain AdamW (no clipping, no decay mask)."""
  return optax.adamw(1e-3, weight_decay=0.05)


def train_state(variables: dict[str, Any], tx: optax.GradientTransformation) -> dict[str, Any]:
  """{'params', 'batch_stats', 'opt_state'}: the state `make_train_step`'s step takes and returns."""
  return {'params': variables['params'], 'batch_stats': variables['batch_stats'],
          'opt_state': tx.init(variables['params'])}


def model_gradients(model, params, batch_stats, x, labels):
  """(gradients of the mean cross-entropy, new batch_stats): one train-mode forward and backward."""
  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                  x, train=True, mutable=['batch_stats'])
    return _cross_entropy(logits, labels), updates['batch_stats']
  return jax.grad(loss_fn, has_aux=True)(params)


def make_train_step(model, tx: optax.GradientTransformation) -> Callable[..., dict[str, Any]]:
  """The timed training step: forward, backward, `tx` update; (state, x, labels) -> state."""
  def train_step(state, x, labels):
    grads, batch_stats = model_gradients(model, state['params'], state['batch_stats'], x, labels)
    step, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], step),
            'batch_stats': batch_stats, 'opt_state': opt_state}

  return train_step


def _peak_memory(framework: str, device: str, fn: Callable[[], Any]) -> float:
  """Peak memory (MiB) around one call of fn: device memory on GPU, RSS growth on CPU."""
  if device == 'cpu':
    return peak_rss_growth(fn)
  if framework == 'torch':
    torch = torch_cases.torch_or_none()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20
  fn()
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use', float('nan')) / 2**20


def device_name(framework: str, device: str) -> str:
  """The device a framework runs on, in words (initializes that framework's backend)."""
  if framework == 'torch':
    torch = torch_cases.torch_or_none()
    return torch.cuda.get_device_name() if device == 'gpu' else f'cpu ({torch.get_num_threads()} threads)'
  d = jax.devices()[0]
  return f'{d.platform}: {d.device_kind}'


def _rows(framework, name, batch, precision, seconds, matmul_rate, stats, peaks, where):
  """One result row per timed function of a case."""
  rows = []
  for what, s in seconds.items():
    macs, flops = flops_per_image(name, what)
    rows.append({
        'framework': framework, 'device_name': where, 'model': models.resolve_name(name),
        'batch': batch,
        'precision': precision, 'what': what, 'images_per_s': batch / s,
        'ms_per_call': 1e3 * s, 'macs_per_image': macs,
        'mfu': flops * batch / s / matmul_rate, 'mfu_matmul_tflops': matmul_rate / 1e12,
        'compile_s': stats.get(f'{what}_compile_s'), 'xla_mib': stats.get(f'{what}_xla_mib'),
        'reparam_s': stats.get('reparam_s') if what == 'deploy_fwd' else None,
        'peak_mib': peaks.get(what)})
  return rows


def measure_isolated(framework: str, plan, precisions, *, device: str, repeats: int,
                     warmup: int, matmul_size: int) -> list[dict[str, Any]]:
  """One framework's rows, each case timed round-robin with that framework's matmul.

  Args:
    framework: 'jax' or 'torch'.
    plan: (model name, batch, whats) triples.
    precisions: which of PRECISIONS[framework] to run.
    device: 'cpu' or 'gpu'.
  """
  torch_device = 'cuda' if device == 'gpu' else 'cpu'
  where, rows = device_name(framework, device), []
  for precision in precisions:
    if framework == 'jax':
      matmul, matmul_flops = jax_matmul(matmul_size, precision)
    else:
      matmul, matmul_flops = torch_cases.torch_matmul(matmul_size, precision, torch_device)
    for name, batch, whats in plan:
      print(f'{framework} {precision} {name} batch {batch}: {", ".join(whats)}', file=sys.stderr,
            flush=True)  # Progress, and where a slow compile is.
      case = (JaxCase(name, batch, precision, whats) if framework == 'jax' else
              torch_cases.TorchCase(name, batch, precision, torch_device, whats))
      seconds = time_round_robin({'matmul': matmul, **case.fns}, repeats, warmup)
      rate = matmul_flops / seconds.pop('matmul')
      peaks = {k: _peak_memory(framework, device, f) for k, f in case.fns.items()}
      rows += _rows(framework, name, batch, precision, seconds, rate, case.stats, peaks, where)
      del case
  return rows


def measure_round_robin(model_names, batch_sizes, *, with_torch: bool, repeats: int,
                        warmup: int, matmul_size: int) -> list[dict[str, Any]]:
  """CPU, float32: JAX, PyTorch and the matmul interleaved in one process, per case."""
  torch = torch_cases.torch_or_none() if with_torch else None
  matmul, matmul_flops = jax_matmul(matmul_size, 'float32')
  rows = []
  for name in model_names:
    for batch in batch_sizes:
      cases = {'jax': JaxCase(name, batch)}
      if torch is not None:
        cases['torch'] = torch_cases.TorchCase(name, batch)
      fns = {'matmul': matmul, **{f'{fw}/{k}': f for fw, c in cases.items()
                                  for k, f in c.fns.items()}}
      seconds = time_round_robin(fns, repeats, warmup)
      rate = matmul_flops / seconds.pop('matmul')
      for fw, case in cases.items():
        where = device_name(fw, 'cpu')
        mine = {k.split('/')[1]: s for k, s in seconds.items() if k.startswith(fw + '/')}
        peaks = {k: peak_rss_growth(f) for k, f in case.fns.items()}
        rows += _rows(fw, name, batch, 'float32', mine, rate, case.stats, peaks, where)
  return rows


def run_in_processes(plan, precisions, *, device: str, frameworks=FRAMEWORKS, repeats: int,
                     warmup: int, matmul_size: int) -> list[dict[str, Any]]:
  """Each framework's `measure_isolated` in a fresh Python process; their rows merged."""
  rows = []
  for framework in frameworks:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'rows.json')
      spec = {'framework': framework, 'plan': [list(p) for p in plan], 'device': device,
              'precisions': [p for p in precisions if p in PRECISIONS[framework]],
              'repeats': repeats, 'warmup': warmup, 'matmul_size': matmul_size, 'out': out}
      run_worker('benchmarks.bench_models', spec)
      with open(out) as f:
        rows += json.load(f)
  return rows


def run_worker(module: str, spec: dict[str, Any], **kwargs) -> subprocess.CompletedProcess:
  """`python -m <module> --worker <spec as JSON>` in a fresh process, run from the repository
  root with the root first on PYTHONPATH; kwargs go to subprocess.run (e.g. capture_output)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
  return subprocess.run([sys.executable, '-m', module, '--worker', json.dumps(spec)],
                        check=True, cwd=root, env=env, **kwargs)


def _worker(spec_json: str) -> int:
  spec = json.loads(spec_json)
  if spec['device'] == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
    if spec['framework'] == 'torch':
      torch_cases.torch_or_none().set_num_threads(_cpu_threads())
  plan = [(name, batch, tuple(whats)) for name, batch, whats in spec['plan']]
  rows = measure_isolated(spec['framework'], plan, spec['precisions'], device=spec['device'],
                          repeats=spec['repeats'], warmup=spec['warmup'],
                          matmul_size=spec['matmul_size'])
  with open(spec['out'], 'w') as f:
    json.dump(rows, f)
  return 0


def _cpu_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def environment(device: str) -> dict[str, Any]:
  """What the figures were measured on (without starting a GPU backend in this process)."""
  torch = torch_cases.torch_or_none()
  return {'device': device, 'cpu_threads': _cpu_threads(), 'jax': jax.__version__,
          'torch': torch.__version__ if torch else None}


def run(model_names, batch_sizes, *, device: str = 'cpu', precisions=('float32',),
        with_torch: bool = True, repeats: int = 5, warmup: int = 1,
        matmul_size: int = 4096) -> dict[str, Any]:
  """Measures every (model, batch) case; returns the figures as a JSON-able dict.

  Args:
    model_names, batch_sizes: the cases (every `what` of each).
    device: 'cpu' (one process, round-robin, float32 only) or 'gpu' (one process per framework,
      every precision asked for).
    precisions: for GPU, any of 'float32', 'tf32' (PyTorch only), 'bfloat16'.
    with_torch: also measure the PyTorch reference (when torch is installed).
  Returns:
    {'environment': ..., 'rows': [one dict per framework, model, batch, precision, what]}.
  """
  torch = torch_cases.torch_or_none() if with_torch else None
  if device == 'cpu':
    if torch is not None:
      torch.set_num_threads(_cpu_threads())  # As many as XLA uses.
    if tuple(precisions) != ('float32',):
      raise ValueError('CPU runs are float32 only; use --device gpu for other precisions.')
    rows = measure_round_robin(model_names, batch_sizes, with_torch=with_torch, repeats=repeats,
                               warmup=warmup, matmul_size=matmul_size)
  else:
    plan = [(name, batch, WHATS) for name in model_names for batch in batch_sizes]
    rows = run_in_processes(plan, precisions, device=device, repeats=repeats, warmup=warmup,
                            matmul_size=matmul_size,
                            frameworks=FRAMEWORKS if torch is not None else ('jax',))
  return {'environment': environment(device), 'rows': rows}


def _fmt(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> str:
  """A markdown table of the rows, with the JAX / PyTorch ratio where both ran."""
  env = results['environment']
  names = sorted({f"{r['framework']}: {r['device_name']}" for r in results['rows']})
  lines = [f"device {env['device']} ({'; '.join(names)}), {env['cpu_threads']} CPU threads, "
           f"jax {env['jax']}, torch {env['torch']}", '',
           '| model | batch | what | framework | precision | img/s | ms/call | GMAC/img | MFU '
           '| matmul TFLOP/s | compile s | xla MiB | peak MiB | jax/torch |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  rows = results['rows']
  for r in rows:
    ratio = ''
    if r['framework'] == 'jax':
      same = [t for t in rows if t['framework'] == 'torch' and
              (t['model'], t['batch'], t['what'], t['precision']) ==
              (r['model'], r['batch'], r['what'], r['precision'])]
      ratio = f"{r['images_per_s'] / same[0]['images_per_s']:.2f}" if same else ''
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['what']} | {r['framework']} | {r['precision']} | "
        f"{r['images_per_s']:.2f} | {r['ms_per_call']:.2f} | {r['macs_per_image'] / 1e9:.4g} | "
        f"{100 * r['mfu']:.1f}% | {r['mfu_matmul_tflops']:.4g} | {_fmt(r['compile_s'], '.1f')} | "
        f"{_fmt(r['xla_mib'], '.0f')} | {_fmt(r['peak_mib'], '.0f')} | {ratio} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['RepMLPNet-B224'])
  parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
  parser.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--precisions', nargs='+', default=['float32'],
                      choices=('float32', 'tf32', 'bfloat16'), help='GPU only')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per function (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls after compilation')
  parser.add_argument('--matmul-size', type=int, default=4096, help='side of the reference matmul')
  parser.add_argument('--no-torch', action='store_true', help='JAX figures only')
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # One framework's process.
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  results = run(args.models, args.batch_sizes, device=args.device, precisions=args.precisions,
                with_torch=not args.no_torch, repeats=args.repeats, warmup=args.warmup,
                matmul_size=args.matmul_size)
  results['command'] = 'python -m benchmarks.bench_models ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  print(format_table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
