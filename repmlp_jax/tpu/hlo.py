"""Reading an optimized HLO module's text: the layout instructions it kept."""

import re


def count_ops(hlo_text: str) -> dict[str, int]:
  """Transposes and copies among the instructions of an optimized HLO module's text (fusion
  bodies included: each is a layout change the compiler could not fold into a reshape or a
  dot)."""
  counts = {'transpose': 0, 'copy': 0}
  for op in re.findall(r'=\s*\S+\s+(transpose|copy)\(', hlo_text):
    counts[op] += 1
  return counts
