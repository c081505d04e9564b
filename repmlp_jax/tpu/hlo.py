"""An optimized HLO module's text: the layout instructions it kept, its loops over matmuls."""

import re


def count_ops(hlo_text: str) -> dict[str, int]:
  """Transposes and copies among the instructions of an optimized HLO module's text (fusion
  bodies included: each is a layout change the compiler could not fold into a reshape or a
  dot)."""
  counts = {'transpose': 0, 'copy': 0}
  for op in re.findall(r'=\s*\S+\s+(transpose|copy)\(', hlo_text):
    counts[op] += 1
  return counts


_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', re.M | re.S)
_CALLED = re.compile(r'(?:calls|body|condition|to_apply)=%([\w.\-]+)'
                     r'|branch_computations=\{([^}]*)\}')


def loops_with_matmuls(hlo_text: str) -> int:
  """The while loops of an optimized HLO module's text whose bodies (or what they call) hold a
  dot or a convolution: the loops that repeat model work (lax.scan over units, gradient
  accumulation, loops the compiler builds around matmuls itself), not those of a sampler. The
  compiler's cost analysis takes a loop's body once, whatever its trip count, so a program with
  such loops moves more than its count says."""
  computations = dict(_COMPUTATION.findall(hlo_text))
  known: dict[str, bool] = {}

  def has_matmul(name: str) -> bool:
    if name not in known:
      known[name] = False  # A computation does not call itself; guards against cycles.
      body = computations.get(name, '')
      callees = []
      for one, many in _CALLED.findall(body):
        callees += [one] if one else re.findall(r'%([\w.\-]+)', many)
      known[name] = bool(re.search(r'\s(?:dot|convolution)\(', body)) or any(
          has_matmul(c) for c in callees)
    return known[name]

  loops = re.findall(r'\swhile\([^\n]*?body=%([\w.\-]+)', hlo_text)
  return sum(has_matmul(body) for body in loops)
