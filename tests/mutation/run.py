"""Mutation testing of the numerical core with cosmic-ray: does a small planted bug fail a test?

    pip install -e '.[test,torch,mutation]'
    python tests/mutation/run.py                      # every target (hours on 2 cores)
    python tests/mutation/run.py fusion reassembly    # some targets
    python tests/mutation/run.py --recheck            # only the survivors of the last run
    python tests/mutation/run.py keys_repmlpnet --functions _bn_affine,_group_to_flax

cosmic-ray edits the module under test in place, so everything runs in a scratch copy of the
tree (default /tmp/repmlp-mutation/src; the working tree is never touched). Each target is one
module (or some of its functions) with the fast tests that should catch a bug there. Mutants
are made by cosmic-ray's core operators, less the ones that only make code that cannot run
(bitwise and shift operators on floats, `is` comparisons of numbers, `%` and `**` on shapes:
these die on the first call and only cost time) and less `Not`/`Invert` of numbers for the same
reason. Each survivor is a line of `<workdir>/<target>.survivors.txt` with its diff; the
survivors of record and why each one is left are in tests/mutation/SURVIVORS.md.

--recheck runs each survivor of the previous sessions again (`cosmic-ray mutate-and-test`)
against the target's tests as they are now, so that new tests can be checked against them
without running every mutant again.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
# Fast compiles for the tiny models: the tests run once per mutant.
ENV_PREFIX = ('env "XLA_FLAGS=--xla_backend_optimization_level=0 '
              '--xla_llvm_disable_expensive_passes=true" PYTHONPATH=. ')
PYTEST = f'{ENV_PREFIX}{PYTHON} -m pytest -x -q -p no:cacheprovider'

# name: (module, functions to mutate (None: all of it), tests that must catch a bug there).
# The fast tests of each target: no compile of a whole model where a float64 unit test exists.
_FUSION_TESTS = ('tests/test_reparam.py tests/test_repmlp_block.py tests/test_core_numerics.py '
                 '-k "by_hand or pad_kernel or conv_to_fc or bn_scale or formula"')
TARGETS = {  # In the order they run: the cheapest first.
    'reassembly': ('repmlp_jax/models/layers.py', ('partition', 'reassemble'),
                   'tests/test_reparam.py tests/test_core_numerics.py '
                   '-k "reassemble or partition"'),
    'reparam_deploy': ('repmlp_jax/reparameterize/deploy.py', None,
                       'tests/test_reparam.py tests/test_core_numerics.py '
                       '-k "float64 or refuse or reparam_equals"'),
    'fusion': ('repmlp_jax/reparameterize/fusion.py', None, _FUSION_TESTS),
    'reparam_repmlpnet': ('repmlp_jax/reparameterize/repmlpnet.py', None,
                          'tests/test_core_numerics.py tests/test_reparam.py '
                          'tests/test_reparam_rules.py '
                          '-k "reparam_equals or equivalence_float64"'),
    'export': ('repmlp_jax/inference/export.py', None, 'tests/test_export.py'),
    'reparam_resnet': ('repmlp_jax/reparameterize/resnet.py', None,
                       'tests/test_repmlp_block.py tests/test_core_numerics.py '
                       'tests/test_reparam_rules.py '
                       '-k "by_hand or float64 or pytorch_reference or v1_rules"'),
    'keys_repmlpnet': ('repmlp_jax/pytorch/keys_repmlpnet.py',
                       ('_bn_to_flax', '_bn_affine', '_identity_bn', '_oihw_to_hwio',
                        '_group_to_flax', '_bn_to_torch', '_group_to_torch'),
                       'tests/test_core_numerics.py tests/test_torch_export.py '
                       'tests/test_torch_import.py -k "identity or round_trip or mmpretrain or '
                       'tiny_deploy_form or reparam_equals"'),
    'keys_resnet': ('repmlp_jax/pytorch/keys_resnet.py',
                    ('_torch_shape', '_to_flax', '_to_torch', 'variables_from_torch',
                     'variables_to_torch'),
                    'tests/test_torch_import_resnet.py tests/test_torch_keys_resnet.py '
                    '-k "deploy_on_import or round_trip or another_model or reported_at_once"'),
    # The key maps' other half: reading a model's settings from a state_dict's shapes.
    'detect_resnet': ('repmlp_jax/pytorch/keys_resnet.py',
                      ('_count_blocks', '_square_side', '_repmlp_settings', 'detect', 'is_deploy',
                       '_detect'),
                      'tests/test_torch_keys_resnet.py -k detect'),
    'detect_repmlpnet': ('repmlp_jax/pytorch/keys_repmlpnet.py',
                         ('is_mmpretrain', '_rename', 'is_deploy', '_shape', 'detect',
                          '_gp_divisor'),
                         'tests/test_torch_import.py -k "detect or mmpretrain or refuses"'),
}

# One natural replacement per operator (a bug someone could write), not every operator pair:
# `a * b` -> `a / b`, `<` -> `<=` and `>=`, ...; the other pairs mostly make code that cannot run
# (bitwise operators on floats) and would multiply the run time.
KEPT_BINARY = 'Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Mul|Pow_Mul|Mod_FloorDiv|MatMul_Mul'
KEPT_COMPARISON = ('Eq_NotEq|NotEq_Eq|Lt_LtE|Lt_GtE|LtE_Lt|LtE_Gt|Gt_GtE|Gt_LtE|GtE_Gt|GtE_Lt|'
                   'Is_IsNot|IsNot_Is|In_NotIn|NotIn_In')
EXCLUDED_OPERATORS = [
    rf'core/ReplaceBinaryOperator_(?!({KEPT_BINARY})$)',
    rf'core/ReplaceComparisonOperator_(?!({KEPT_COMPARISON})$)',
    r'core/ReplaceUnaryOperator_(?!(USub_UAdd|Delete_USub|Delete_Not)$)',
]
TIMEOUT_S = 900.0  # Per mutant; a loaded 2-core machine compiles slowly.


def copy_tree(dest: str) -> None:
  """The tracked and untracked-but-not-ignored files of the working tree, copied to `dest`."""
  files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode().split('\0')
  if os.path.exists(dest):
    shutil.rmtree(dest)
  for f in filter(None, files):
    if not os.path.isfile(os.path.join(ROOT, f)):
      continue
    os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def function_lines(path: str, names) -> list[str]:
  """'first-last' line ranges of the top-level functions `names` of the module at `path`."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  ranges = [f'{n.lineno}-{n.end_lineno}' for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name in names]
  if len(ranges) != len(names):
    raise SystemExit(f'{path}: not all of {names} found.')
  return ranges


EXCLUDED_TESTS: set[str] = set()  # --exclude-tests: measure the score without some test files.


def test_args(src: str, name: str) -> str:
  """The target's pytest arguments, less test files this tree does not have or are excluded."""
  words = TARGETS[name][2].split(' -k ')
  files = [w for w in words[0].split()
           if os.path.exists(os.path.join(src, w)) and w not in EXCLUDED_TESTS]
  return ' -k '.join([' '.join(files)] + words[1:])


FUNCTIONS: dict[str, tuple[str, ...]] = {}  # --functions: a narrower set than the target's.


def write_config(src: str, workdir: str, name: str) -> str:
  module, functions, _ = TARGETS[name]
  functions = FUNCTIONS.get(name, functions)
  tests = test_args(src, name)
  lines = [
      '[cosmic-ray]',
      f'module-path = "{module}"',
      f'timeout = {TIMEOUT_S}',
      'excluded-modules = []',
      f'test-command = {json.dumps(f"{PYTEST} {tests}")}',
      '',
      '[cosmic-ray.distributor]',
      'name = "local"',
      '',
      '[cosmic-ray.filters.operators-filter]',
      f'exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}',
  ]
  if functions:
    ranges = function_lines(os.path.join(src, module), functions)
    lines += ['', '[cosmic-ray.filters.line-filter]',
              f'lines = {{ "{module}" = {json.dumps(ranges)} }}']
  path = os.path.join(workdir, f'{name}.toml')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def tool(name: str) -> str:
  return os.path.join(os.path.dirname(PYTHON), name)


def results(session: str) -> list[tuple[dict, dict | None]]:
  out = subprocess.run([tool('cosmic-ray'), 'dump', session], check=True, capture_output=True,
                       text=True).stdout
  return [tuple(json.loads(line)) for line in out.splitlines() if line.strip()]


def summarize(workdir: str, name: str, rows) -> tuple[int, int]:
  """Writes <name>.survivors.txt; returns (killed, total) over the mutants that ran."""
  done = [(item, res) for item, res in rows if res and res['worker_outcome'] != 'skipped']
  survivors = [(item, res) for item, res in done if res['test_outcome'] == 'survived']
  with open(os.path.join(workdir, f'{name}.survivors.txt'), 'w', encoding='utf-8') as f:
    for item, res in survivors:
      m = item['mutations'][0]
      f.write(f"{m['module_path']}:{m['start_pos'][0]} {m['operator_name']} #{m['occurrence']}\n")
      f.write((res.get('diff') or '') + '\n')
  return len(done) - len(survivors), len(done)


def run_target(src: str, workdir: str, name: str, dry_run: bool = False) -> tuple[int, int]:
  config = write_config(src, workdir, name)
  session = os.path.join(workdir, f'{name}.sqlite')
  if os.path.exists(session):
    os.remove(session)
  subprocess.run([tool('cosmic-ray'), 'init', config, session], cwd=src, check=True)
  subprocess.run([tool('cr-filter-operators'), session, config], cwd=src, check=True)
  if FUNCTIONS.get(name, TARGETS[name][1]):
    subprocess.run([tool('cr-filter-lines'), '--config', config, session], cwd=src, check=True)
  pending = sum(1 for _, r in results(session) if r is None)
  print(f'[{name}] {pending} mutants', flush=True)
  if dry_run:
    return 0, pending
  # The tests must pass on the unmutated code, or every mutant would count as killed.
  subprocess.run([tool('cosmic-ray'), 'baseline', config], cwd=src, check=True)
  subprocess.run([tool('cosmic-ray'), 'exec', config, session], cwd=src, check=True)
  return summarize(workdir, name, results(session))


def recheck_target(src: str, workdir: str, name: str) -> tuple[int, int]:
  """Runs the survivors of the last session against the tests as they are now."""
  session = os.path.join(workdir, f'{name}.sqlite')
  rows = results(session)
  tests = test_args(src, name)
  rechecked = []
  for item, res in rows:
    if res and res['worker_outcome'] != 'skipped' and res['test_outcome'] == 'survived':
      m = item['mutations'][0]
      out = subprocess.run(
          [tool('cosmic-ray'), 'mutate-and-test', m['module_path'], m['operator_name'],
           str(m['occurrence']), f'{PYTEST} {tests}'], cwd=src, capture_output=True, text=True)
      new = json.loads(out.stdout)
      new['diff'] = res.get('diff')
      print(f"[{name}] {m['module_path']}:{m['start_pos'][0]} {m['operator_name']}: "
            f"{new['test_outcome']}", flush=True)
      res = new
    rechecked.append((item, res))
  with open(os.path.join(workdir, f'{name}.recheck.json'), 'w', encoding='utf-8') as f:
    json.dump(rechecked, f)
  return summarize(workdir, name, rechecked)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('targets', nargs='*', help=f'some of {sorted(TARGETS)}; default all')
  parser.add_argument('--workdir', default='/tmp/repmlp-mutation')
  parser.add_argument('--recheck', action='store_true',
                      help='run only the survivors of the previous sessions again')
  parser.add_argument('--dry-run', action='store_true', help='only count the mutants')
  parser.add_argument('--exclude-tests', action='append', default=[], metavar='FILE',
                      help='a test file left out (to measure what newer tests add); repeatable')
  parser.add_argument('--functions', default='', metavar='F1,F2',
                      help='mutate only these top-level functions of the (single) target: a '
                           'shorter run over the numerical lines of a large module')
  args = parser.parse_args()
  EXCLUDED_TESTS.update(args.exclude_tests)
  names = args.targets or list(TARGETS)
  if args.functions:
    if len(names) != 1:
      raise SystemExit('--functions needs exactly one target.')
    FUNCTIONS[names[0]] = tuple(args.functions.split(','))
  unknown = sorted(set(names) - set(TARGETS))
  if unknown:
    raise SystemExit(f'Unknown targets {unknown}; choose from {sorted(TARGETS)}.')
  os.makedirs(args.workdir, exist_ok=True)
  src = os.path.join(args.workdir, 'src')
  copy_tree(src)
  scores = {}
  for name in names:
    start = time.time()
    if args.recheck:
      killed, total = recheck_target(src, args.workdir, name)
    else:
      killed, total = run_target(src, args.workdir, name, args.dry_run)
    scores[name] = (killed, total)
    print(f'[{name}] killed {killed} of {total} ({time.time() - start:.0f} s); survivors in '
          f'{args.workdir}/{name}.survivors.txt', flush=True)
  killed, total = (sum(v[i] for v in scores.values()) for i in (0, 1))
  print(f'score: {killed}/{total} = {100 * killed / max(total, 1):.1f}% killed')
  with open(os.path.join(args.workdir, 'scores.json'), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'recheck': args.recheck, 'scores': scores}) + '\n')


if __name__ == '__main__':
  main()
