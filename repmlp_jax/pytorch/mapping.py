"""What every PyTorch <-> Flax key mapping shares: one complete report of mismatched keys.

A family's mapping module (one per model family) turns a PyTorch state_dict (name -> numpy array,
official key names) into Flax variables and back. Before converting anything it compares the
names and shapes it expects with those it got, and reports every missing, unexpected and
mis-shaped key at once, so a user sees the whole problem in one error and nothing is written.
Every family's `detect(state_dict) -> (name, overrides, deploy)` raises `DetectionError`.
The message gives the counts and the first few keys of each kind; `describe(verbose=True)` lists
every one.
"""

from typing import Mapping, Sequence

SHOWN = 4  # Keys of each kind named in the short message.


class KeyMismatchError(ValueError):
  """A state_dict does not fit the model: counts and names the missing, unexpected, mis-shaped."""

  def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str],
               misshaped: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    self.what = what
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    super().__init__(self.describe())

  @property
  def truncated(self) -> bool:
    """Whether the short message leaves keys out."""
    return max(len(self.missing), len(self.unexpected), len(self.misshaped)) > SHOWN

  def describe(self, verbose: bool = False) -> str:
    """The report: the first few keys of each kind, or every key with `verbose`."""
    shown = None if verbose else SHOWN

    def first(keys):
      more = len(keys) - len(keys[:shown])
      return ', '.join(keys[:shown]) + (f', ... ({more} more)' if more else '')

    lines = [f'The checkpoint does not fit {self.what}:']
    if self.missing:
      lines.append(f'  {len(self.missing)} missing key(s): {first(self.missing)}')
    if self.unexpected:
      lines.append(f'  {len(self.unexpected)} unexpected key(s): {first(self.unexpected)}')
    if self.misshaped:
      lines.append(f'  {len(self.misshaped)} mis-shaped key(s):')
      for key, want, got in self.misshaped[:shown]:
        lines.append(f'    {key}: expected shape {want}, got {got}')
      if len(self.misshaped[:shown]) < len(self.misshaped):
        lines.append(f'    ... ({len(self.misshaped) - len(self.misshaped[:shown])} more)')
    lines.append('Check the model name (or let it be detected) and whether the file holds the '
                 'training or the deploy form.')
    return '\n'.join(lines)


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
