"""The benchmarks: MACs counted by hand for the tiny variant, the one-shot script run on CPU."""

import json

import numpy as np
import pytest

import repmlp_jax
from benchmarks import bench_compile
from benchmarks import bench_memory
from benchmarks import gpu_b224
from repmlp_jax import macs
from repmlp_jax.tpu import hlo

TINY = '_RepMLPNet-Tiny'


def test_macs_per_image_by_hand_for_the_tiny_variant():
  # Input 32 x 32; channels (8, 16, 16, 32), depths (1, 1, 2, 1), windows (4, 2, 1, 1),
  # GP hidden C // 4, FFN x4, 1000 classes. Per unit: GP 2*C*C/4, fc3 positions*C*h*w,
  # FFN 2*positions*C*4C; the training form adds positions*C*(1 + 9) for the 1x1 and 3x3 branches.
  stem = 8 * 8 * 8 * 3 * 16
  stage0 = 2 * 8 * 2 + 64 * 8 * 16 + 2 * 64 * 8 * 32
  stage1 = 16 * 16 * 8 * 4 + (2 * 16 * 4 + 16 * 16 * 4 + 2 * 16 * 16 * 64)
  stage2 = 4 * 16 * 16 * 4 + 2 * (2 * 16 * 4 + 4 * 16 * 1 + 2 * 4 * 16 * 64)
  stage3 = 1 * 32 * 16 * 4 + (2 * 32 * 8 + 1 * 32 * 1 + 2 * 1 * 32 * 128)
  head = 32 * 1000
  deploy = stem + stage0 + stage1 + stage2 + stage3 + head
  assert deploy == 171328
  branches = 10 * (64 * 8 + 16 * 16 + 2 * 4 * 16 + 1 * 32)
  model = repmlp_jax.create_model(TINY)
  assert macs.macs_per_image(model.clone(deploy=True)) == deploy
  assert macs.macs_per_image(model) == deploy + branches


@pytest.mark.parametrize('name, paper', [('RepMLPNet-T224', 2.8e9), ('RepMLPNet-B224', 6.7e9),
                                         ('RepMLPNet-L256', 11.5e9)])
def test_macs_per_image_agree_with_the_papers(name, paper):
  got = macs.macs_per_image(repmlp_jax.create_model(name, deploy=True))
  assert abs(got - paper) <= 0.01 * paper


def test_count_ops_reads_optimized_hlo():
  text = ('%transpose.1 = f32[2,3]{1,0} transpose(f32[3,2]{1,0} %p), dimensions={1,0}\n'
          '%copy.2 = f32[2,3]{0,1} copy(%transpose.1)\n  ROOT %copy_fusion = f32[2] fusion(%x)\n')
  assert hlo.count_ops(text) == {'transpose': 1, 'copy': 1}


def test_breakdown_counts_operands_and_results_by_kind():
  text = ('HloModule m\n\nENTRY %main {\n'
          '  %p0 = f32[2,4]{1,0} parameter(0)\n'
          '  %p1 = f32[4,4]{1,0} parameter(1)\n'
          '  %dot.1 = f32[2,4]{1,0} dot(%p0, %p1), metadata={op_name="jit(f)/stages_0_1/fc/dot_general"}\n'
          '  %copy.2 = f32[4,2]{0,1} copy(%dot.1)\n'
          '  ROOT %add_fusion = f32[2,4]{1,0} fusion(%dot.1, %p0), kind=kLoop, '
          'metadata={op_name="jit(f)/stages_0_0/add"}\n}\n')
  got = bench_memory.breakdown(text, batch=2)
  # dot: 32 + 64 in, 32 out; copy: 32 in, 32 out; add: 32 + 32 in, 32 out; bytes per image.
  assert got['kinds'] == {'matmul': 64.0, 'layout': 32.0, 'element-wise': 48.0}
  assert got['groups'][0] == (64.0, 1, 'matmul', 'stages_0/fc/dot_general')
  assert (48.0, 1, 'element-wise', 'stages_0/add') in got['groups']


def test_one_shot_script_runs_on_cpu(tmp_path):
  # The accelerator script's whole path (a process per framework, every precision, JSON and
  # markdown), on CPU with the tiny variant; the training step (a long compile) is left out.
  torch_there = pytest.importorskip('torch') is not None
  assert gpu_b224.main(['--device', 'cpu', '--model', TINY, '--batches', '2', '1', '0',
                        '--repeats', '1', '--warmup', '0', '--matmul-size', '64',
                        '--out-dir', str(tmp_path)]) == 0
  results = json.loads((tmp_path / 'gpu_b224.json').read_text())
  rows = results['rows']
  expected = {('jax', p) for p in ('float32', 'bfloat16')}
  expected |= {('torch', p) for p in ('float32', 'tf32', 'bfloat16')} if torch_there else set()
  assert {(r['framework'], r['precision']) for r in rows} == expected
  deploy_macs = macs.macs_per_image(repmlp_jax.create_model(TINY, deploy=True))
  for framework, precision in expected:
    assert sorted((r['what'], r['batch']) for r in rows if (r['framework'], r['precision']) == (
        framework, precision)) == [('deploy_fwd', 1), ('deploy_fwd', 2), ('train_fwd', 2)]
  for r in rows:
    assert r['model'] == TINY
    assert r['images_per_s'] > 0 and 0 < r['mfu'] < np.inf and r['mfu_matmul_tflops'] > 0
    if r['what'] == 'deploy_fwd':
      assert r['macs_per_image'] == deploy_macs
    if r['framework'] == 'jax':
      assert r['compile_s'] > 0 and r['xla_mib'] > 0
  table = (tmp_path / 'gpu_b224.md').read_text()
  assert table.count(f'| {TINY} |') == len(rows)


def test_distinct_units_group_the_tiny_variants_units_by_stage():
  model = repmlp_jax.create_model(TINY)
  groups = bench_compile.distinct_units(model, np.zeros((2, 32, 32, 3), np.float32))
  assert [g['names'] for g in groups] == [['stages_0_0'], ['stages_1_0'],
                                          ['stages_2_0', 'stages_2_1'], ['stages_3_0']]
  # Stage 3 is one window (1 x 1): its units see the channels as (C/S, S) = (4, 8).
  assert [g['input'].shape for g in groups] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16),
                                                (2, 1, 1, 4, 8)]


def test_compile_breakdown_runs_in_a_fresh_process_and_sums_the_parts(tmp_path):
  # Two cheap parts of the tiny variant's step, each compiled once in its own process.
  out = tmp_path / 'compile.json'
  assert bench_compile.main(['--model', TINY, '--batch-size', '2', '--repeats', '1', '--parts',
                             'optimizer', 'unit_2', '--out', str(out)]) == 0
  results = json.loads(out.read_text())
  assert results['environment']['fresh_processes'] and len(results['runs']) == 2
  parts = results['parts']
  assert parts['unit_2']['count'] == 2 and parts['unit_2']['input_shape'] == [2, 2, 2, 16]
  for part in parts.values():
    assert part['lower_s']['min'] > 0 and part['compile_cpu_s']['min'] > 0
    assert part['fusions']['min'] >= 1
  predicted = results['predicted']
  assert predicted['units']['fusions']['min'] == 2 * parts['unit_2']['fusions']['min']
  assert predicted['units_optimizer']['compile_s']['median'] == pytest.approx(
      2 * parts['unit_2']['compile_s']['median'] + parts['optimizer']['compile_s']['median'])


def test_compile_breakdown_refuses_an_unknown_part():
  with pytest.raises(ValueError, match='Unknown part'):
    bench_compile.run(TINY, batch=2, repeats=1, parts=['unit_9'], fresh_processes=False)
