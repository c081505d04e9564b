"""Speed of RepMLPNet in JAX (and of the PyTorch reference, same run): inference and training.

    python -m benchmarks.bench_models                          # B224, batch 1 and 8
    python -m benchmarks.bench_models --models b224 t224 --batch-sizes 8 --repeats 7 --json out.json

For each variant and batch size: images/s of (a) training-form inference, (b) deploy-form
inference, (c) one full training step (forward, backward, AdamW update, train-mode BatchNorm);
compile time (JAX: lower + compile), reparam time (after compilation) and memory. When torch is
installed, the same for `tests/torch_reference.py` (training form, the official deploy form,
AdamW step) with torch.set_num_threads equal to the cores JAX uses, and the JAX/PyTorch ratios.
Also the machine's float32 matmul rate (a large jnp.dot) and the deploy model's FLOPs (XLA cost
analysis) per second as a fraction of it.

Timing: every measured function is warmed up, then the repeats run round-robin over all of
them (JAX and PyTorch interleaved), so load from other processes hits every candidate alike;
figures are medians, each call ends with block_until_ready (JAX) or a finished CPU op (PyTorch).
Memory: "xla MiB" is XLA's memory analysis of the compiled program (temporaries + arguments +
outputs); "rss MiB" is the peak growth of the process's resident memory during one call
(sampled every 2 ms), for both frameworks.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import repmlp_jax
from repmlp_jax.models import factory as models
from repmlp_jax.reparameterize import deploy as reparameterize

try:
  import torch
except ImportError:  # PyTorch is optional: JAX figures only.
  torch = None


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


def matmul_case(size: int) -> tuple[Callable[[], Any], float]:
  """A (size x size) @ (size x size) float32 jnp.dot on the default device, and its FLOPs."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  return (lambda: dot(a, b).block_until_ready()), 2.0 * size**3


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class JaxCase:
  """Compiled JAX callables of one variant and batch size, with compile/reparam figures."""

  def __init__(self, name: str, batch: int):
    model = repmlp_jax.create_model(name)
    size = model.image_size or model.input_multiple
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    labels = jnp.arange(batch) % model.num_classes
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    self.stats: dict[str, float] = {}

    def compile_(what, fn, *args, **jit_kwargs):
      start = time.perf_counter()
      compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
      self.stats[f'{what}_compile_s'] = time.perf_counter() - start
      self.stats[f'{what}_xla_mib'] = xla_memory_mib(compiled)
      return compiled

    reparam = compile_('reparam', functools.partial(reparameterize.reparam_variables, model),
                       variables)
    deploy_variables = jax.block_until_ready(reparam(variables))
    start = time.perf_counter()
    jax.block_until_ready(reparam(variables))
    self.stats['reparam_s'] = time.perf_counter() - start
    deploy_model = model.clone(deploy=True)

    train_fwd = compile_('train_fwd', lambda v, x: model.apply(v, x, train=False), variables, x)
    deploy_fwd = compile_('deploy_fwd', lambda v, x: deploy_model.apply(v, x, train=False),
                          deploy_variables, x)
    self.deploy_flops = deploy_fwd.cost_analysis()['flops']

    tx = optax.adamw(1e-3, weight_decay=0.05)
    # Own copies: the step donates its state, the inference functions keep `variables`.
    params, batch_stats = jax.tree.map(jnp.copy, (variables['params'], variables['batch_stats']))
    state = {'params': params, 'batch_stats': batch_stats, 'opt_state': tx.init(params)}

    def train_step(state, x, labels):
      def loss_fn(params):
        logits, updates = model.apply({'params': params, 'batch_stats': state['batch_stats']},
                                      x, train=True, mutable=['batch_stats'])
        return _cross_entropy(logits, labels), updates
      grads, updates = jax.grad(loss_fn, has_aux=True)(state['params'])
      step, opt_state = tx.update(grads, state['opt_state'], state['params'])
      return {'params': optax.apply_updates(state['params'], step),
              'batch_stats': updates['batch_stats'], 'opt_state': opt_state}

    step = compile_('train_step', train_step, state, x, labels, donate_argnums=0)
    self._state = state

    def run_step():
      self._state = jax.block_until_ready(step(self._state, x, labels))

    self.fns = {
        'train_fwd': lambda: train_fwd(variables, x).block_until_ready(),
        'deploy_fwd': lambda: deploy_fwd(deploy_variables, x).block_until_ready(),
        'train_step': run_step,
    }


class TorchCase:
  """The PyTorch reference of one variant and batch size (CPU)."""

  def __init__(self, name: str, batch: int):
    from tests import torch_reference  # Needs the repository root on sys.path.
    settings = models.MODELS[models.resolve_name(name)][1]
    size = settings['image_size']
    model = torch_reference.create_repmlpnet_custom(
        settings['channels'], settings['depths'], settings['partitions'], settings['sharesets'])
    x = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % 1000
    self.stats: dict[str, float] = {}
    model.eval()
    start = time.perf_counter()
    deploy = model.to_deploy().eval()
    self.stats['reparam_s'] = time.perf_counter() - start
    train_model = torch_reference.create_repmlpnet_custom(
        settings['channels'], settings['depths'], settings['partitions'], settings['sharesets'])
    train_model.train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3, weight_decay=0.05)

    def run_step():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(train_model(x), labels)
      loss.backward()
      opt.step()

    def infer(m):
      with torch.inference_mode():
        m(x)

    self.fns = {
        'train_fwd': lambda: infer(model),
        'deploy_fwd': lambda: infer(deploy),
        'train_step': run_step,
    }


def run(model_names, batch_sizes, *, repeats: int = 5, warmup: int = 1, with_torch: bool = True,
        matmul_size: int = 4096) -> dict[str, Any]:
  """Measures every (model, batch) case; returns the figures as a JSON-able dict."""
  threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  use_torch = with_torch and torch is not None
  if use_torch:
    torch.set_num_threads(threads)
  results = {'device': str(jax.devices()[0]), 'threads': threads, 'jax': jax.__version__,
             'torch': torch.__version__ if use_torch else None, 'matmul_size': matmul_size,
             'cases': []}
  matmul, matmul_flops = matmul_case(matmul_size)
  for name in model_names:
    for batch in batch_sizes:
      jax_case = JaxCase(name, batch)
      # The matmul rate is timed in the same round-robin, under the same load.
      fns = {'matmul': matmul, **{f'jax_{k}': f for k, f in jax_case.fns.items()}}
      torch_case = TorchCase(name, batch) if use_torch else None
      if torch_case:
        fns.update({f'torch_{k}': f for k, f in torch_case.fns.items()})
      seconds = time_round_robin(fns, repeats, warmup)
      # Measured after the timing; the train-step sample includes its optimizer state update.
      rss = {k: peak_rss_growth(f) for k, f in fns.items() if k != 'matmul'}
      case = {'model': models.resolve_name(name), 'batch': batch,
              'images_per_s': {k: batch / s for k, s in seconds.items() if k != 'matmul'},
              'matmul_gflops': matmul_flops / seconds['matmul'] / 1e9,
              'rss_mib': rss, 'jax': jax_case.stats,
              'torch': torch_case.stats if torch_case else None}
      deploy_rate = jax_case.deploy_flops / seconds['jax_deploy_fwd']
      case['deploy_gflops'] = deploy_rate / 1e9
      case['deploy_fraction_of_matmul'] = deploy_rate / (case['matmul_gflops'] * 1e9)
      case['deploy_over_train_fwd'] = seconds['jax_train_fwd'] / seconds['jax_deploy_fwd']
      if torch_case:
        case['jax_over_torch'] = {k: seconds[f'torch_{k}'] / seconds[f'jax_{k}']
                                  for k in jax_case.fns}
      results['cases'].append(case)
  return results


def format_table(results: dict[str, Any]) -> str:
  lines = [f"device {results['device']}, {results['threads']} threads, jax {results['jax']}, "
           f"torch {results['torch']}"]
  header = (f"{'model':16} {'batch':>5} {'what':12} {'jax img/s':>10} {'torch img/s':>11} "
            f"{'ratio':>6} {'compile s':>9} {'xla MiB':>8} {'rss MiB jax/torch':>18}")
  lines += [header, '-' * len(header)]
  for c in results['cases']:
    for what in ('train_fwd', 'deploy_fwd', 'train_step'):
      ips = c['images_per_s']
      t = ips.get(f'torch_{what}')
      ratio = c.get('jax_over_torch', {}).get(what)
      rss_t = c['rss_mib'].get(f'torch_{what}')
      lines.append(
          f"{c['model']:16} {c['batch']:5d} {what:12} {ips[f'jax_{what}']:10.2f} "
          f"{t if t is not None else float('nan'):11.2f} "
          f"{ratio if ratio is not None else float('nan'):6.2f} "
          f"{c['jax'][f'{what}_compile_s']:9.1f} {c['jax'][f'{what}_xla_mib']:8.0f} "
          f"{c['rss_mib'][f'jax_{what}']:8.0f} / {rss_t if rss_t is not None else float('nan'):7.0f}")
    torch_reparam = c['torch']['reparam_s'] if c['torch'] else float('nan')
    lines.append(
        f"{'':16} {'':5} deploy: {c['deploy_gflops']:.1f} GFLOP/s = "
        f"{100 * c['deploy_fraction_of_matmul']:.0f}% of the matmul rate "
        f"({c['matmul_gflops']:.1f} GFLOP/s, {results['matmul_size']}^2 jnp.dot); deploy/train fwd "
        f"{c['deploy_over_train_fwd']:.2f}x; reparam {c['jax']['reparam_s']:.3f} s "
        f"(compile {c['jax']['reparam_compile_s']:.1f} s; torch {torch_reparam:.3f} s)")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['RepMLPNet-B224'])
  parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per function (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls after compilation')
  parser.add_argument('--matmul-size', type=int, default=4096, help='side of the reference matmul')
  parser.add_argument('--no-torch', action='store_true', help='JAX figures only')
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  args = parser.parse_args(argv)
  results = run(args.models, args.batch_sizes, repeats=args.repeats, warmup=args.warmup,
                with_torch=not args.no_torch, matmul_size=args.matmul_size)
  results['command'] = 'python -m benchmarks.bench_models ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  print(format_table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
