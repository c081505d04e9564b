"""RepMLPNet's programs as the TPU compiler counts them, without a TPU: bytes, FLOPs, memory.

    python -m benchmarks.bench_tpu_step                         # B224: step, eval, deploy, units
    python -m benchmarks.bench_tpu_step --programs units        # one unit per stage: seconds
    python -m benchmarks.bench_tpu_step --programs step --json step.json

Lowers and compiles, with libtpu's compiler on this machine (`TPU_SKIP_MDS_QUERY=1`, devices of
`--topology`, default v5e:2x2), the programs of bench_models in bfloat16 compute:

- `step`: one training step (forward, backward, AdamW; train-mode BatchNorm), `--batch` images
  per chip (default 128);
- `eval`: the training form's forward in eval mode, `--eval-batch` per chip (default 256), on
  bfloat16 images as train.py's evaluation sends them;
- `deploy`: the deploy form's forward, `--eval-batch` per chip, on bfloat16 images and weights
  cast to bfloat16 beforehand (BatchNorms float32: `factory.cast_params`), as train.py evaluates
  it and the Predictor serves it;
- `units`: one RepMLPNet unit of each stage, forward and backward (gradients of the parameters
  and of the input, new BatchNorm statistics) at `--batch` per chip, its input shaped as
  RepMLPNet feeds it, its BatchNorms in `--bn-groups` groups; its bytes times the stage's depth
  are the units' share of the step.

Inputs are sharded over the images (NamedSharding on a Mesh of every device of the topology),
the variables replicated. Per program: FLOPs and bytes accessed per image (XLA's cost analysis,
per chip), temporaries per chip (memory analysis), copy and transpose ops of the optimized
program, the v5e roofline (images / max(FLOPs / peak, bytes / bandwidth), per chip) and the
compile's wall and process CPU seconds. Nothing is run.
"""

import argparse
import functools
import json
import os
import resource
import sys
import time
from typing import Any, Sequence

os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# Other processes on this machine may hold libtpu too; compiling needs no exclusive chip.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import repmlp_jax
from benchmarks import bench_compile
from benchmarks import bench_models
from repmlp_jax.models import factory
from repmlp_jax.tpu import hlo
from repmlp_jax.train import sharding

V5E_PEAK_FLOPS = 197e12  # bf16 dense, per chip.
V5E_HBM_BYTES_PER_S = 819e9
PROGRAMS = ('units', 'step', 'eval', 'deploy')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def figures(fn, args, images: int, **jit_kwargs) -> dict[str, Any]:
  """Compiles fn for `args` (ShapeDtypeStructs with shardings); the TPU compiler's figures.

  Args:
    fn: the program.
    args: its abstract arguments.
    images: images per chip of one call (the per-image figures divide by it).
  """
  wall, cpu = time.perf_counter(), _cpu_seconds()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  flops, accessed = cost['flops'], cost['bytes accessed']
  seconds = max(flops / V5E_PEAK_FLOPS, accessed / V5E_HBM_BYTES_PER_S)
  return {'images_per_chip': images, 'gflop_per_image': flops / images / 1e9,
          'mb_per_image': accessed / images / 1e6, 'temp_gib': memory.temp_size_in_bytes / 2**30,
          'argument_gib': memory.argument_size_in_bytes / 2**30,
          'copy_start': text.count(' copy-start('), **hlo.count_ops(text),
          'v5e_roofline_img_s': images / seconds, 'compile_wall_s': wall, 'compile_cpu_s': cpu}


class Programs:
  """The abstract arguments and programs of one variant on a mesh of TPU devices."""

  def __init__(self, name: str, topology: str, batch: int, eval_batch: int,
               stages: Sequence[int] | None = None, bn_groups: int = 1):
    devices = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
    self.mesh = Mesh(np.array(devices), ('data',))
    self.chips = len(devices)
    self.batch, self.eval_batch = batch, eval_batch
    self.stages = stages
    self.bn_groups = bn_groups
    self.model = repmlp_jax.create_model(name, dtype=jnp.bfloat16)
    self.size = self.model.image_size or self.model.input_multiple
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P('data'))
    x1 = jax.ShapeDtypeStruct((1, self.size, self.size, 3), jnp.float32)
    self.variables = sharding.placed(jax.eval_shape(self.model.init, jax.random.key(0), x1),
                                     self.replicated)

  def images(self, per_chip: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    """Training images are float32 (mixup and CutMix mix them before the model's cast); the
    evaluation pipeline sends them in the compute dtype (input_pipeline.create_split)."""
    return jax.ShapeDtypeStruct((per_chip * self.chips, self.size, self.size, 3), dtype,
                                sharding=self.sharded)

  def step(self) -> dict[str, Any]:
    tx = bench_models.adamw()
    state = sharding.placed(jax.eval_shape(functools.partial(bench_models.train_state, tx=tx),
                                           self.variables), self.replicated)
    labels = jax.ShapeDtypeStruct((self.batch * self.chips,), jnp.int32, sharding=self.sharded)
    return figures(bench_models.make_train_step(self.model, tx),
                   (state, self.images(self.batch), labels), self.batch, donate_argnums=0)

  def eval(self) -> dict[str, Any]:
    return figures(lambda v, x: self.model.apply(v, x, train=False),
                   (self.variables, self.images(self.eval_batch, self.model.dtype)),
                   self.eval_batch)

  def deploy(self) -> dict[str, Any]:
    """The deploy form as train.py evaluates it and the Predictor serves it: its weights cast to
    the compute dtype once, beforehand (factory.cast_params), and images in that dtype."""
    model = self.model.clone(deploy=True)
    x1 = jax.ShapeDtypeStruct((1, self.size, self.size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: factory.cast_params(
        model.init(jax.random.key(0), jnp.zeros(x1.shape, x1.dtype)), model.dtype))
    return figures(lambda v, x: model.apply(v, x, train=False),
                   (sharding.placed(variables, self.replicated),
                    self.images(self.eval_batch, model.dtype)), self.eval_batch)

  def units(self) -> dict[str, Any]:
    """One unit per stage, forward and backward; {stage: figures}, each with its depth.

    The units and their inputs are those the model's training step calls and feeds
    (`bench_compile.distinct_units`), their BatchNorms in `bn_groups` groups.
    """
    results = {}
    x1 = jax.ShapeDtypeStruct((1, self.size, self.size, 3), jnp.float32)
    for group in bench_compile.distinct_units(self.model, x1):
      stage = int(group['path'][0].split('_')[1])  # 'stages_<stage>_<unit>'
      if self.stages is not None and stage not in self.stages:
        continue
      unit = group['module'].clone(bn_groups=self.bn_groups)
      x = jax.ShapeDtypeStruct((self.batch * self.chips, *group['input'].shape[1:]),
                               group['input'].dtype, sharding=self.sharded)
      variables = sharding.placed(jax.eval_shape(unit.init, jax.random.key(0), x),
                                  self.replicated)

      def forward_backward(variables, x, unit=unit):
        def loss(params, x):
          y, updates = unit.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
          return jnp.sum(y.astype(jnp.float32) ** 2), updates['batch_stats']
        grads, stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
        return grads, stats

      results[f'stage_{stage}'] = {'depth': len(group['names']),
                                   **figures(forward_backward, (variables, x), self.batch)}
    return results


def format_line(label: str, f: dict[str, Any]) -> str:
  return (f"{label:10} {f['mb_per_image']:9.1f} {f['gflop_per_image']:8.2f} {f['temp_gib']:7.2f} "
          f"{f['copy']:5d} {f['copy_start']:6d} {f['transpose']:5d} "
          f"{f['v5e_roofline_img_s']:8.0f} {f['compile_wall_s']:7.1f} {f['compile_cpu_s']:7.1f}")


HEADER = (f"{'program':10} {'MB/image':>9} {'GFLOP/i':>8} {'temp GiB':>7} {'copy':>5} "
          f"{'cp-start':>6} {'trans':>5} {'v5e img/s':>8} {'wall s':>7} {'cpu s':>7}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='RepMLPNet-B224')
  parser.add_argument('--topology', default='v5e:2x2')
  parser.add_argument('--batch', type=int, default=128, help='training images per chip')
  parser.add_argument('--eval-batch', type=int, default=256, help='eval images per chip')
  parser.add_argument('--programs', nargs='+', choices=PROGRAMS, default=list(PROGRAMS))
  parser.add_argument('--stages', nargs='+', type=int, default=None,
                      help='units: only these stages (0-based; default all)')
  parser.add_argument('--bn-groups', type=int, default=1,
                      help='units: BatchNorm statistics per this many groups of the global batch '
                           "(train.py's global_batch_size / bn_group_size; 1: the whole batch)")
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  args = parser.parse_args(argv)
  programs = Programs(args.model, args.topology, args.batch, args.eval_batch, args.stages,
                      args.bn_groups)
  results = {'model': args.model, 'topology': args.topology, 'jax': jax.__version__}
  print(HEADER, flush=True)
  for name in args.programs:
    found = getattr(programs, name)()
    results[name] = found
    if name == 'units':
      total = 0.0
      for stage, f in found.items():
        print(format_line(stage, f), flush=True)
        total += f['depth'] * f['mb_per_image']
      print(f'units x depth: {total:.1f} MB/image', flush=True)
    else:
      print(format_line(name, found), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
