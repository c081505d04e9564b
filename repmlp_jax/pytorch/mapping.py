"""What every PyTorch <-> Flax key mapping shares: one complete report of mismatched keys.

A family's mapping module (one per model family) turns a PyTorch state_dict (name -> numpy array,
official key names) into Flax variables and back. Before converting anything it compares the
names and shapes it expects with those it got, and reports every missing, unexpected and
mis-shaped key at once, so a user sees the whole problem in one error and nothing is written.
Every family's `detect(state_dict) -> (name, overrides, deploy)` raises `DetectionError`.
"""

from typing import Mapping, Sequence


class KeyMismatchError(ValueError):
  """A state_dict does not fit the model: lists every missing, unexpected and mis-shaped key."""

  def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str],
               misshaped: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f'The checkpoint does not fit {what}:']
    if self.missing:
      lines.append(f'  {len(self.missing)} missing key(s): ' + ', '.join(self.missing))
    if self.unexpected:
      lines.append(f'  {len(self.unexpected)} unexpected key(s): ' + ', '.join(self.unexpected))
    for key, want, got in self.misshaped:
      lines.append(f'  {key}: expected shape {want}, got {got}')
    lines.append('Check the model name (or let it be detected) and whether the file holds the '
                 'training or the deploy form.')
    super().__init__('\n'.join(lines))


class DetectionError(ValueError):
  """A family's `detect` cannot read the model's settings from a state_dict (not that family's,
  inconsistent or ambiguous); passing the model's name gives the full key report instead."""


def check_keys(what: str, expected: Mapping[str, tuple[int, ...]],
               got: Mapping[str, tuple[int, ...]]) -> None:
  """Raises KeyMismatchError unless `got` has exactly the `expected` names and shapes.

  Args:
    what: the model, for the message (e.g. 'RepMLPNet-B224 (training form)').
    expected: key -> shape the model needs.
    got: key -> shape the checkpoint holds.
  """
  missing = [k for k in expected if k not in got]
  unexpected = [k for k in got if k not in expected]
  misshaped = [(k, tuple(expected[k]), tuple(got[k])) for k in expected
               if k in got and tuple(expected[k]) != tuple(got[k])]
  if missing or unexpected or misshaped:
    raise KeyMismatchError(what, missing, unexpected, misshaped)
