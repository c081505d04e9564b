"""train.py's programs compiled for TPU topologies on the CPU (libtpu, the 'tpu' extra).

One compile of the tiny variant's three programs for v5e:2x2 is shared by the report tests;
the refusals (a program too large for the chip, an unknown topology name) are one line each and
train.py's exit status 2.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_memory
from configs import imagenet_b224
from repmlp_jax import macs
from repmlp_jax.commands import cli
from repmlp_jax.models import factory
from repmlp_jax.tpu import compile_report
from repmlp_jax.tpu import hlo
from repmlp_jax.tpu import topologies
from repmlp_jax.tpu import train_programs
from tests.test_cli_messages import ROOT
from tests.test_cli_messages import run_train_py

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="compiling for TPU needs libtpu: pip install -e '.[tpu]' (the 'tpu' extra)")
TINY_SETTINGS = dict(channels=(8, 16), depths=(1, 1), partitions=(4, 2), sharesets=(2, 4))


def tiny_config(topology: str, **changes):
  """The ImageNet recipe (mixup / CutMix, clipping, BatchNorm groups, bfloat16) on a tiny model."""
  config = imagenet_b224.get_config()
  config.model = '_RepMLPNet-Tiny'
  config.model_overrides.update(TINY_SETTINGS)
  config.image_size = config.eval_image_size = 32
  config.global_batch_size = config.eval_batch_size = 64
  config.compile_topology = topology
  config.update(changes)
  return config


@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('compile_v5e_2x2')
  return workdir, compile_report.compile_for_topology(tiny_config('v5e:2x2'), str(workdir))


@needs_libtpu
def test_tiny_programs_compile_for_v5e_2x2(compiled):
  workdir, report = compiled
  assert report['chips'] == 4 and report['device_kind'] == 'TPU v5 lite'
  assert list(report['programs']) == ['train_step', 'eval_step', 'deploy_forward']
  with open(workdir / compile_report.REPORT_FILE, encoding='utf-8') as f:
    assert json.load(f) == report
  for p in report['programs'].values():
    assert p['batch_per_chip'] == 16 and p['compile_s'] > 0 and p['compile_cpu_s'] > 0
    assert p['fits'] and p['flops_per_chip'] > 0 and p['copies'] >= 0
  step, evaluation = report['programs']['train_step'], report['programs']['eval_step']
  assert step['flops_per_chip'] > 2 * evaluation['flops_per_chip']  # Backward and update too.


@needs_libtpu
def test_report_fields_agree_with_each_other(compiled):
  _, report = compiled
  chip = topologies.CHIPS['v5e']
  model = factory.create_model('_RepMLPNet-Tiny', **TINY_SETTINGS)
  useful = {'train_step': 6 * macs.macs_per_image(model, 32),
            'eval_step': 2 * macs.macs_per_image(model, 32),
            'deploy_forward': 2 * macs.macs_per_image(model.clone(deploy=True), 32)}
  for name, p in report['programs'].items():
    batch = p['batch_per_chip']
    assert math.isclose(p['bytes_per_image'] * batch, p['bytes_accessed_per_chip'])
    assert p['hbm_capacity_bytes_per_chip'] == 16 * 2**30
    assert p['fits'] == (p['hbm_bytes_per_chip'] <= p['hbm_capacity_bytes_per_chip'])
    seconds = max(p['flops_per_chip'] / 197e12, p['bytes_accessed_per_chip'] / 819e9)
    assert math.isclose(p['roofline_img_per_s_per_chip'], batch / seconds)
    assert math.isclose(p['mfu_bound'], batch / seconds * useful[name] / chip.peak_bf16_flops)


# bench_tpu_memory defines absl flags (--config) as train.py does: it runs in its own process.
_BENCHMARK_INPUTS = """
import json, jax
from benchmarks import bench_tpu_memory
from repmlp_jax.tpu import topologies
from repmlp_jax.train import sharding
from tests import helpers
mesh = sharding.create_mesh(topologies.devices(topologies.parse('v5e:2x2')))
args = {p.name: p.lowered.args_info[0] for p in bench_tpu_memory.model_programs(
    '_RepMLPNet-Tiny', 16, 16, 'bfloat16', mesh)}
dtypes = lambda tree: sorted({str(a.dtype) for a in jax.tree.leaves(tree)})
deploy = args['deploy_forward'][0]
print(json.dumps({'images': {n: dtypes(a[1]) for n, a in args.items()},
                  'eval_variables': dtypes(args['eval_step'][0]),
                  'deploy_float32': sorted(helpers.float32_params(deploy)),
                  'deploy_batch_norms': sorted(helpers.batch_norm_params(deploy))}))
"""


@needs_libtpu
def test_the_tpu_benchmarks_feed_the_forwards_as_train_py_does():
  """bench_tpu_memory --model and bench_tpu_step: float32 training images, bfloat16 images to
  both forwards, the deploy form's weights cast beforehand with its BatchNorms float32."""
  from benchmarks import bench_tpu_step  # pylint: disable=import-outside-toplevel
  done = subprocess.run([sys.executable, '-c', _BENCHMARK_INPUTS], cwd=ROOT, timeout=300,
                        env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                        check=True)
  found = json.loads(done.stdout.splitlines()[-1])
  assert found['images'] == {'train_step': ['float32'], 'eval_step': ['bfloat16'],
                             'deploy_forward': ['bfloat16']}
  assert found['eval_variables'] == ['float32']  # The training form casts inside the model.
  assert found['deploy_float32'] == found['deploy_batch_norms'] != []
  deploy = bench_tpu_step.Programs('_RepMLPNet-Tiny', 'v5e:2x2', 4, 4).deploy()
  assert deploy['images_per_chip'] == 4 and deploy['mb_per_image'] > 0


def test_figures_of_a_hand_written_program():
  text = '\n'.join([
      'ENTRY %main {',
      '  %p = bf16[16,8,8,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)',
      '  %copy.1 = bf16[16,8,8,128]{0,3,2,1:T(8,128)(2,1)} copy(%p)',
      '  %copy-start = (bf16[8]{0}, bf16[8]{0}, u32[]) copy-start(%x)',
      '  %copy_fusion = bf16[16]{0} fusion(%copy.1), kind=kLoop, calls=%fused_copy',
      '  ROOT %copy.2 = bf16[16,8,8,128]{3,2,1,0:T(8,128)(2,1)} copy(%copy.1)',
      '}'])
  memory = types.SimpleNamespace(argument_size_in_bytes=100, temp_size_in_bytes=50,
                                 output_size_in_bytes=30, alias_size_in_bytes=20)
  program = types.SimpleNamespace(as_text=lambda: text, memory_analysis=lambda: memory,
                                  cost_analysis=lambda: {'flops': 4e12, 'bytes accessed': 8e9})
  chip = topologies.CHIPS['v5e']
  got = compile_report.figures(program, 16, chip, useful_flops_per_image=1e11)
  assert got['copies'] == 2  # copy instructions only: not copy-start, not a fusion's name.
  assert got['hbm_bytes_per_chip'] == 160 and got['fits']
  assert got['bytes_per_image'] == 0.5e9
  rate = 16 / max(4e12 / 197e12, 8e9 / 819e9)  # HBM-bound: 9.8 ms of traffic, 20 ms of math.
  assert math.isclose(got['roofline_img_per_s_per_chip'], rate)
  assert math.isclose(got['mfu_bound'], rate * 1e11 / 197e12)


@needs_libtpu
def test_loops_over_matmuls_are_flagged_as_counted_once():
  """A lax.scan over matmuls is counted once by the cost analysis, whatever its length; the
  report flags it. The Beta sampler's loops (mixup) hold no matmul and are not flagged."""
  mesh = jax.sharding.Mesh(topologies.devices(topologies.parse('v5e:2x2')), ('data',))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16, sharding=whole)

  def scanned(w, x):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0]

  def unrolled(w, x):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x

  def sampled(w, x):
    return x @ w[0] * jax.random.beta(jax.random.key(0), 0.8, 0.8)

  found = {}
  for f in (scanned, unrolled, sampled):
    for n in (1, 4):
      w = jax.ShapeDtypeStruct((n, 128, 128), jnp.bfloat16, sharding=whole)
      program = jax.jit(f).lower(w, x).compile()
      text = program.as_text()
      found[f.__name__, n] = (compile_report._first(program.cost_analysis())['flops'],
                              hlo.loops_with_matmuls(text), text.count(' while('))
  # The scan's body counted once whatever its length (the loop counter aside).
  assert math.isclose(found['scanned', 4][0], found['scanned', 1][0], rel_tol=1e-3)
  assert math.isclose(found['unrolled', 4][0], 4 * found['unrolled', 1][0], rel_tol=1e-3)
  assert found['scanned', 4][1:] == (1, 1) and found['unrolled', 4][1:] == (0, 0)
  assert found['sampled', 1][1] == 0 and found['sampled', 1][2] > 0


def test_the_table_marks_programs_with_loops_over_model_work():
  entry = dict(batch_per_chip=8, flops_per_chip=1e12, bytes_per_image=5e7, hbm_bytes_per_chip=2**30,
               fits=True, copies=3, roofline_img_per_s_per_chip=100.0, mfu_bound=0.5,
               compile_s=1.0, compile_cpu_s=2.0)
  report = {'model': 'm', 'dtype': 'bfloat16', 'topology': 'v5e-4', 'chips': 4,
            'device_kind': 'TPU v5 lite',
            'programs': {'train_step': {**entry, 'loops_with_matmuls': 4},
                         'eval_step': {**entry, 'loops_with_matmuls': 0}}}
  lines = compile_report.format_table(report).splitlines()
  assert '50.0*' in lines[2] and '50.0*' not in lines[3]
  assert lines[-1].startswith('* loops over model work')
  report['programs'].pop('train_step')
  assert '*' not in compile_report.format_table(report)


def test_the_breakdown_counts_tpu_tiles_and_asynchronous_moves():
  text = '\n'.join([
      'HloModule m', '', 'ENTRY %main {',
      '  %p0 = bf16[2,8,4]{2,1,0:T(8,128)(2,1)} parameter(0)',  # 4 lanes pad to 128: 4 KiB.
      '  %p1 = f32[8]{0:T(128)} parameter(1)',  # 512 bytes.
      '  %copy.1 = bf16[2,8,4]{1,2,0:T(8,128)(2,1)} copy(bf16[2,8,4]{2,1,0:T(8,128)(2,1)} %p0)',
      '  %cs = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)}, u32[]{:S(2)}) copy-start(%p1)',
      '  ROOT %cd = f32[8]{0:T(128)S(1)} copy-done(%cs)',
      '}'])
  got = bench_memory.breakdown(text, batch=2)
  assert got['kinds'] == {'layout': 2 * 4096 / 2, 'async move': 2 * 512 / 2}


def test_the_compilers_out_of_memory_refusal_is_read():
  error = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required '
                       'for HLO temporaries (16.81G) exceeds available HBM (15.75G)')
  assert compile_report.out_of_hbm(error) == (int(16.81 * 2**30), int(15.75 * 2**30))
  assert compile_report.out_of_hbm(RuntimeError('INTERNAL: something else')) is None


def test_a_program_that_does_not_fit_is_one_line_and_exit_2():
  chip = topologies.CHIPS['v5e']
  config = tiny_config('v5e-1', global_batch_size=4096)
  fits = {'hbm_bytes_per_chip': 2**30, 'hbm_capacity_bytes_per_chip': chip.hbm_bytes,
          'fits': True}
  report = {'topology': 'v5e-1', 'device_kind': 'TPU v5 lite', 'programs': {
      'train_step': {'hbm_bytes_per_chip': int(23.5 * 2**30),
                     'hbm_capacity_bytes_per_chip': chip.hbm_bytes, 'fits': False},
      'eval_step': fits, 'deploy_forward': fits}}
  with pytest.raises(compile_report.DoesNotFit) as caught:
    compile_report.check_fits(report, config)
  assert cli.exit_status(caught.value) == 2
  assert str(caught.value) == (
      'train_step does not fit on v5e-1: it needs 23.50 GiB per chip, 16.00 GiB available (TPU '
      'v5 lite); lower it with --config.global_batch_size (now 4096), --config.grad_accum_steps '
      '(now 1).')
  config.fsdp = False  # The state replicated: sharding it is one more lever.
  with pytest.raises(compile_report.DoesNotFit) as caught:
    compile_report.check_fits(report, config)
  assert str(caught.value).endswith(
      '--config.grad_accum_steps (now 1), or shard the state with --config.fsdp=True (now False).')
  report['programs']['train_step'] = fits
  compile_report.check_fits(report, config)  # Everything fits: no error.


def test_the_compilers_refusal_for_memory_becomes_a_report_entry():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (16.81G) exceeds available HBM (15.75G)')

  def refuse():
    raise jax.errors.JaxRuntimeError(message)

  program = train_programs.Program('train_step', types.SimpleNamespace(compile=refuse), 512,
                                   None)
  entry, compiled = compile_report.compile_program(program, 4, topologies.CHIPS['v5e'])
  assert compiled is None and not entry['fits'] and entry['batch_per_chip'] == 128
  assert entry['hbm_bytes_per_chip'] == int(16.81 * 2**30)
  assert entry['compiler_hbm_limit_bytes'] == int(15.75 * 2**30)


def test_another_compiler_failure_is_one_line_naming_the_op():
  message = ('RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of memory in memory '
             'space vmem while allocating on stack for %fusion.1742 = bf16[4,6272,384] fusion(), '
             'metadata={op_name="jit(_train_step)/RepMLPNetUnit/prebn1/mul" stack_frame_id=3}.')

  def fail():
    raise jax.errors.JaxRuntimeError(message)

  program = train_programs.Program('train_step', types.SimpleNamespace(compile=fail), 512, None)
  entry, compiled = compile_report.compile_program(program, 4, topologies.CHIPS['v5e'])
  assert compiled is None and not entry['fits']
  report = {'topology': 'v5e-4', 'programs': {'train_step': entry}}
  with pytest.raises(compile_report.CompileFailed) as caught:
    compile_report.check_fits(report, tiny_config('v5e-4'))
  assert cli.exit_status(caught.value) == 2 and str(caught.value) == (
      'train_step does not compile for v5e-4: RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom '
      '(at jit(_train_step)/RepMLPNetUnit/prebn1/mul); see compile_report.json for the other '
      'programs.')
  assert 'did not compile' in compile_report.format_table({**report, 'model': 'm', 'dtype': 'd',
                                                           'chips': 4, 'device_kind': 'k'})


@needs_libtpu
def test_a_batch_the_chips_do_not_share_evenly_is_refused_before_compiling(tmp_path):
  with pytest.raises(cli.ConfigError, match='global_batch_size=6 must be a multiple of the 4 '):
    compile_report.compile_for_topology(tiny_config('v5e-4', global_batch_size=6), str(tmp_path))


@pytest.mark.parametrize('name, generation, grid', [
    ('v5e-4', 'v5e', (2, 2)), ('v5litepod-256', 'v5e', (16, 16)), ('v5e-1', 'v5e', (1, 1)),
    ('v6e-8', 'v6e', (2, 4)), ('v5p-8', 'v5p', (2, 2, 1)), ('v5p-128', 'v5p', (4, 4, 4)),
    ('v4-32', 'v4', (2, 2, 4)), ('V5P-16', 'v5p', (2, 2, 2)), ('v5e:2x2', 'v5e', (2, 2)),
    ('v5p:2x2x1', 'v5p', (2, 2, 1)), ('v4-4096', 'v4', (8, 16, 16))])
def test_topology_names(name, generation, grid):
  target = topologies.parse(name)
  assert (target.generation, target.grid) == (generation, grid)
  assert target.chips == math.prod(grid)


@pytest.mark.parametrize('name', ['v5e-3', 'v5p-6', 'v7x-8', 'v5e:2x2x1', 'tpu', 'v6e-512'])
def test_unknown_topologies_are_refused_naming_the_known_forms(name):
  with pytest.raises(topologies.UnknownTopology) as caught:
    topologies.parse(name)
  message = str(caught.value)
  assert '\n' not in message and cli.exit_status(caught.value) == 2
  assert f'unknown TPU topology {name!r}' in message
  assert 'v5e-N = v5litepod-N' in message and 'v5e:2x2' in message and 'v5p-8' in message


def test_train_py_says_an_unknown_topology_in_one_line(tmp_path):
  code, lines = run_train_py('--config', 'configs/imagenet_b224.py', '--workdir',
                             str(tmp_path / 'work'), '--config.compile_topology=v5e-3')
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("train.py: error: unknown TPU topology 'v5e-3'; known forms: ")


@needs_libtpu
def test_train_py_ends_with_one_line_when_a_real_program_does_not_fit(tmp_path):
  """A real compile for one v5e chip: 2^21 evaluation images (24 GiB of inputs alone) do not
  fit its 16 GiB; libtpu refuses both forwards in seconds, the report is written, and the run
  ends with the one line and exit 2."""
  workdir = tmp_path / 'work'
  code, lines = run_train_py('--config', 'configs/digits.py', '--workdir', str(workdir),
                             '--config.compile_topology=v5e-1', '--config.eval_batch_size=2097152')
  assert code == 2, lines
  assert lines[-1].startswith('train.py: error: eval_step does not fit on v5e-1: it needs '), lines
  assert lines[-1].endswith('GiB per chip, 16.00 GiB available (TPU v5 lite); lower it with '
                            '--config.eval_batch_size (now 2097152).'), lines
  with open(workdir / compile_report.REPORT_FILE, encoding='utf-8') as f:
    programs = json.load(f)['programs']
  assert programs['train_step']['fits'] and not programs['eval_step']['fits']
  assert programs['eval_step']['hbm_bytes_per_chip'] > programs['eval_step'][
      'hbm_capacity_bytes_per_chip']
