"""Where a TPU program's bytes go, by kind and by op: libtpu's compiler on this CPU, no TPU.

    # train.py's own programs (the config's step, evaluation and deploy forward):
    python -m benchmarks.bench_tpu_memory --config configs/imagenet_b224.py \\
        --config.global_batch_size=512 --config.eval_batch_size=1024 --topology v5e-4
    # bench_models' programs of a named model (step: forward, backward, AdamW), global batch:
    python -m benchmarks.bench_tpu_memory --model b224 --batch 512 --topology v5e-4 \\
        --programs train_step --breakdown 40 --json step.json

Prints the compile report of each program (repmlp_jax/tpu/compile_report.py: FLOPs, bytes per
image, HBM per chip, copies, roofline, compile seconds) and, with `--breakdown N`, the bytes per
image of each program split by kind and by op_name, largest first, as bench_memory --breakdown
splits an XLA:CPU program (its parser; the top-level instructions of the optimized TPU program,
so a loop counts as one instruction). `--dtype` sets the compute dtype of --model
(default bfloat16, as the ImageNet configs).
"""

import json
import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

import repmlp_jax
from benchmarks import bench_memory
from benchmarks import bench_models
from repmlp_jax import macs
from repmlp_jax.models import factory
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.tpu import compile_report
from repmlp_jax.tpu import topologies
from repmlp_jax.tpu import train_programs
from repmlp_jax.train import sharding

PROGRAMS = train_programs.NAMES
_CONFIG = config_flags.DEFINE_config_file('config', None, 'train.py config (or use --model).')
_MODEL = flags.DEFINE_string('model', None, "A model name: bench_models' programs of it.")
_BATCH = flags.DEFINE_integer('batch', 512, '--model: global batch of the training step.')
_EVAL_BATCH = flags.DEFINE_integer('eval_batch', None, '--model: global batch of the forwards '
                                   '(default: 2 x --batch).')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', '--model: compute dtype.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e-4', 'TPU target (repmlp_jax.tpu.topologies).')
_WHICH = flags.DEFINE_list('programs', list(PROGRAMS), f'Which of {", ".join(PROGRAMS)}.')
_BREAKDOWN = flags.DEFINE_integer('breakdown', 30, 'List the N largest ops per program (0: none).')
_JSON = flags.DEFINE_string('json', None, 'Also write the report and breakdowns here.')


def model_programs(name: str, batch: int, eval_batch: int, dtype: str,
                   mesh: jax.sharding.Mesh) -> list[train_programs.Program]:
  """bench_models' programs of `name`: its training step (forward, backward, AdamW) and the two
  eval-mode forwards; images split over `mesh`, variables and optimizer state replicated. As in
  train.py, the forwards take images in the compute dtype and the deploy form's weights cast to
  it beforehand (`factory.cast_params`); the step's images are float32."""
  model = repmlp_jax.create_model(name, dtype=dtype)
  deploy_model = model.clone(deploy=True)
  size = model.image_size or model.input_multiple
  split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def images(n, image_dtype=jnp.float32):
    return jax.ShapeDtypeStruct((n, size, size, 3), image_dtype, sharding=split)

  variables = sharding.placed(jax.eval_shape(model.init, jax.random.key(0), images(1)), whole)
  tx = bench_models.adamw()
  state = sharding.placed(jax.eval_shape(lambda v: bench_models.train_state(v, tx), variables),
                          whole)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)
  deploy_variables = sharding.placed(jax.eval_shape(
      lambda v: factory.cast_params(reparameterize.reparam_variables(model, v), model.dtype),
      variables), whole)

  def forward(m):
    return jax.jit(lambda v, x: m.apply(v, x, train=False))

  useful = 2.0 * macs.macs_per_image(model)
  return [
      train_programs.Program(
          'train_step', jax.jit(bench_models.make_train_step(model, tx), donate_argnums=0)
          .lower(state, images(batch), labels), batch, 3 * useful),
      train_programs.Program(
          'eval_step', forward(model).lower(variables, images(eval_batch, model.dtype)),
          eval_batch, useful),
      train_programs.Program(
          'deploy_forward',
          forward(deploy_model).lower(deploy_variables, images(eval_batch, model.dtype)),
          eval_batch, 2.0 * macs.macs_per_image(deploy_model)),
  ]


def main(argv) -> int:
  del argv
  unknown = sorted(set(_WHICH.value) - set(PROGRAMS))
  if unknown or (_CONFIG.value is None) == (_MODEL.value is None):
    raise app.UsageError(f'give --config or --model; --programs from {", ".join(PROGRAMS)}.')
  target = topologies.parse(_TOPOLOGY.value)
  devices = topologies.devices(target)
  mesh = sharding.create_mesh(devices)
  if _MODEL.value:
    programs = model_programs(_MODEL.value, _BATCH.value, _EVAL_BATCH.value or 2 * _BATCH.value,
                              _DTYPE.value, mesh)
    about = {'model': _MODEL.value, 'dtype': _DTYPE.value, 'programs_of': 'bench_models'}
  else:
    config = _CONFIG.value
    programs = train_programs.lower(config, mesh, tuple(_WHICH.value))
    about = {'model': config.model, 'dtype': config.dtype, 'programs_of': 'train.py'}
  programs = [p for p in programs if p.name in _WHICH.value]
  report, compiled = compile_report.compile_all(target, programs, devices, **about)
  print(compile_report.format_table(report))
  cases = []
  for name, program in compiled.items():
    if program is not None and _BREAKDOWN.value:
      batch = report['programs'][name]['batch_per_chip']
      cases.append({'model': about['model'], 'form': name,
                    'breakdown': bench_memory.breakdown(program.as_text(), batch)})
  if cases:
    print(bench_memory.format_breakdown({'cases': cases}, _BREAKDOWN.value))
  if _JSON.value:
    with open(_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({**report, 'breakdowns': cases}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main))
