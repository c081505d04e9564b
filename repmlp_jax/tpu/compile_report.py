"""Compiles train.py's programs for a named TPU topology on any CPU and says what each chip needs.

    python train.py --config configs/imagenet_b224.py --workdir W --config.compile_topology=v5e-4

`compile_for_topology(config, workdir)` compiles the training step, the evaluation step and the
deploy forward (`train_programs`) with libtpu's compiler for the target's devices, writes
`W/compile_report.json`, prints a table, and raises `DoesNotFit` (one line, train.py exits 2)
when a program needs more HBM per chip than the chip has. Per program, per chip:

  batch_per_chip              images per call on one chip
  compile_s, compile_cpu_s    wall and process CPU seconds of the compile
  flops_per_chip              the compiler's cost analysis ('flops')
  bytes_accessed_per_chip     the compiler's cost analysis ('bytes accessed'): HBM traffic
  bytes_per_image             bytes_accessed_per_chip / batch_per_chip
  hbm_bytes_per_chip          arguments + temporaries + outputs - aliased (memory analysis)
  hbm_capacity_bytes_per_chip the chip's published HBM (topologies.CHIPS)
  fits                        hbm_bytes_per_chip <= capacity, and the compiler accepted it
  copies                      copy instructions left in the optimized program (layout changes)
  loops_with_matmuls          while loops that repeat model work (scan_units, gradient
                              accumulation, or loops the compiler builds itself, as v6e's
                              around convolutions and matmuls): the cost analysis takes each
                              body once, so the FLOPs and bytes above undercount such a program
                              (the table marks it with *) and its roofline overstates
  roofline_img_per_s_per_chip batch / max(flops / peak bf16, bytes / HBM bandwidth)
  mfu_bound                   the useful FLOPs (repmlp_jax.macs) at the roofline rate over peak

A program the compiler refuses for HBM (RESOURCE_EXHAUSTED ... exceeds available HBM) is reported
with the bytes the compiler said it needed, `fits` false and no cost figures; one it refuses for
another reason (e.g. on-chip VMEM) with `compile_error`, and the run ends with that in one line.
"""

import contextlib
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections

from repmlp_jax.commands import cli
from repmlp_jax.tpu import hlo
from repmlp_jax.tpu import topologies
from repmlp_jax.tpu import train_programs
from repmlp_jax.train import sharding

REPORT_FILE = 'compile_report.json'
# libtpu's refusal: "... the total memory required for HLO temporaries (16.81G) exceeds
# available HBM (15.75G)" (binary units).
_OUT_OF_HBM = re.compile(r'RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM'
                         r'\s*\(([\d.]+)([KMGT]?)\)', re.S)
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


class DoesNotFit(cli.ConfigError):
  """A program needs more HBM per chip than the target's chips have."""


def _first(cost: Any) -> dict[str, float]:
  return cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one dict per device.


def figures(compiled, batch_per_chip: int, chip: topologies.Chip,
            useful_flops_per_image: float | None) -> dict[str, Any]:
  """The report's figures of one compiled program (see the module docstring)."""
  cost = _first(compiled.cost_analysis())
  memory = compiled.memory_analysis()
  flops, moved = float(cost['flops']), float(cost['bytes accessed'])
  text = compiled.as_text()
  hbm = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
         + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  rate = batch_per_chip / max(flops / chip.peak_bf16_flops, moved / chip.hbm_bandwidth)
  return {
      'flops_per_chip': flops, 'bytes_accessed_per_chip': moved,
      'bytes_per_image': moved / batch_per_chip, 'hbm_bytes_per_chip': int(hbm),
      'hbm_capacity_bytes_per_chip': chip.hbm_bytes, 'fits': hbm <= chip.hbm_bytes,
      'copies': hlo.count_ops(text)['copy'], 'loops_with_matmuls': hlo.loops_with_matmuls(text),
      'roofline_img_per_s_per_chip': rate,
      'mfu_bound': (None if useful_flops_per_image is None
                    else rate * useful_flops_per_image / chip.peak_bf16_flops)}


def out_of_hbm(error: BaseException) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from libtpu's out-of-memory refusal; None for others."""
  found = _OUT_OF_HBM.search(str(error))
  if not found:
    return None
  need, need_unit, have, have_unit = found.groups()
  return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])


def compile_program(program: train_programs.Program, chips: int,
                    chip: topologies.Chip) -> tuple[dict[str, Any], Any]:
  """Compiles one program: (its report entry, the compiled program or None when the compiler
  refused it for memory: a refusal is an entry, not an error)."""
  batch = program.batch // chips
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  refused = failure = None
  try:
    compiled = program.lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    refused, failure = out_of_hbm(e), e
    compiled = None
  entry = {'batch_per_chip': batch, 'compile_s': time.perf_counter() - start_wall,
           'compile_cpu_s': time.process_time() - start_cpu}
  if compiled is None and refused is None:
    return {**entry, 'fits': False, 'compile_error': _one_line(failure)}, None
  if compiled is None:
    need, have = refused
    return {**entry, 'hbm_bytes_per_chip': need, 'hbm_capacity_bytes_per_chip': chip.hbm_bytes,
            'fits': False, 'compiler_hbm_limit_bytes': have}, None
  return {**entry, **figures(compiled, batch, chip, program.useful_flops_per_image)}, compiled


def _one_line(error: BaseException) -> str:
  """The compiler's error in one line: its first line and the op it names, if any."""
  text = str(error).strip()
  op_name = re.search(r'op_name="([^"]*)"', text)
  where = f' (at {op_name.group(1)})' if op_name else ''
  return text.splitlines()[0].rstrip(':') + where


class CompileFailed(cli.ConfigError):
  """The TPU compiler refused a program for another reason than its HBM."""


def _fix(name: str, config: ml_collections.ConfigDict) -> str:
  batch = ('global_batch_size', 'grad_accum_steps') if name == 'train_step' else (
      'eval_batch_size',)
  fix = 'lower it with ' + ', '.join(f'--config.{f} (now {config[f]})' for f in batch)
  return fix if config.fsdp else fix + ', or shard the state with --config.fsdp=True (now False)'


def check_fits(report: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Raises DoesNotFit for the first program of `report` that does not fit, in one line."""
  for name, p in report['programs'].items():
    if 'compile_error' in p:
      raise CompileFailed(f'{name} does not compile for {report["topology"]}: '
                          f'{p["compile_error"]}; see {REPORT_FILE} for the other programs.')
    if not p['fits']:
      raise DoesNotFit(
          f'{name} does not fit on {report["topology"]}: it needs '
          f'{p["hbm_bytes_per_chip"] / topologies.GiB:.2f} GiB per chip, '
          f'{p["hbm_capacity_bytes_per_chip"] / topologies.GiB:.2f} GiB available '
          f'({report["device_kind"]}); {_fix(name, config)}.')


def format_table(report: dict[str, Any]) -> str:
  """The report as a short table (one row per program)."""
  lines = [f'{report["model"]} ({report["dtype"]}) on {report["topology"]}: {report["chips"]} x '
           f'{report["device_kind"]}, figures per chip',
           f'{"program":15} {"img":>5} {"TFLOP":>7} {"MB/img":>8} {"HBM GiB":>8} {"fits":>4} '
           f'{"copies":>6} {"img/s":>7} {"MFU<=":>6} {"compile s":>9} {"CPU s":>6}']
  for name, p in report['programs'].items():
    if 'compile_error' in p:
      lines.append(f'{name:15} {p["batch_per_chip"]:5d} did not compile: {p["compile_error"]}')
      continue
    hbm = f'{p["hbm_bytes_per_chip"] / topologies.GiB:8.2f}'
    if 'flops_per_chip' not in p:  # Refused by the compiler for HBM.
      lines.append(f'{name:15} {p["batch_per_chip"]:5d} {"-":>7} {"-":>8} {hbm} {"no":>4}'
                   f'{"":33} {p["compile_s"]:9.1f} {p["compile_cpu_s"]:6.1f}')
      continue
    mfu = '-' if p['mfu_bound'] is None else f'{100 * p["mfu_bound"]:5.1f}%'
    mark = '*' if p.get('loops_with_matmuls') else ' '
    lines.append(
        f'{name:15} {p["batch_per_chip"]:5d} {p["flops_per_chip"] / 1e12:7.3f} '
        f'{p["bytes_per_image"] / 1e6:7.1f}{mark} {hbm} {"yes" if p["fits"] else "no":>4} '
        f'{p["copies"]:6d} {p["roofline_img_per_s_per_chip"]:7.0f} {mfu:>6} '
        f'{p["compile_s"]:9.1f} {p["compile_cpu_s"]:6.1f}')
  if any(p.get('loops_with_matmuls') for p in report['programs'].values()):
    lines.append('* loops over model work (scan_units, gradient accumulation, or the '
                 "compiler's own): the compiler counts each loop body once, so its FLOPs and "
                 'bytes are too low and its img/s and MFU too high.')
  return '\n'.join(lines)


def _replace(path: str, text: str) -> None:
  """Writes `path` whole or not at all; a rerun's report replaces the previous one."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def _no_persistent_cache():
  """Compiles for real meanwhile: a persistent-cache hit would time nothing."""
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)


def compile_all(target: topologies.Target, programs: list[train_programs.Program],
                devices: list, **about: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the report of `programs` compiled for `target`, {name: compiled program or None}).

  `about` (model, dtype, ...) goes into the report as it is.
  """
  report = {'topology': target.name, 'topology_grid': target.topology_name,
            'chips': len(devices), 'device_kind': devices[0].device_kind, **about,
            'programs': {}}
  compiled = {}
  with _no_persistent_cache():
    for program in programs:
      report['programs'][program.name], compiled[program.name] = compile_program(
          program, len(devices), target.chip)
  return report, compiled


def compile_for_topology(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Compiles the config's programs for config.compile_topology; writes and prints the report.

  Args:
    config: an experiment config with compile_topology set (a name topologies.parse takes).
    workdir: where compile_report.json goes.
  Returns:
    The report (also in workdir/compile_report.json, which a rerun replaces).
  Raises:
    topologies.UnknownTopology, topologies.MissingLibtpu, DoesNotFit, CompileFailed: each said
    in one line.
  """
  target = topologies.parse(config.compile_topology)
  devices = topologies.devices(target)
  with _no_persistent_cache():
    programs = train_programs.lower(config, sharding.create_mesh(devices))
  report, _ = compile_all(target, programs, devices, model=config.model, dtype=config.dtype)
  if jax.process_index() == 0:
    _replace(os.path.join(workdir, REPORT_FILE), json.dumps(report, indent=1) + '\n')
    print(format_table(report), flush=True)
  check_fits(report, config)
  return report
