"""PyTorch reference models and checkpoint files for the importer / exporter tests.

Writes the official reference model's weights in every layout the importer reads (raw,
{'model', 'config', ...} training checkpoints, `module.` prefix, EMA, mmpretrain), and compares
Flax logits with PyTorch logits.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tests import helpers
from tests import torch_reference as tr

# The package's private '_RepMLPNet-Tiny': several windows per stage and C/S > 1, so the
# official re-assembly permutation matters. Input 32 x 32.
TINY = dict(channels=(8, 16, 16, 32), depths=(1, 1, 2, 1), hs=(4, 2, 1, 1), sharesets=(2, 4, 4, 8))
TINY_NAME = '_RepMLPNet-Tiny'
TINY_CLASSES = 10
# Relative error of float32 logits where no float64 truth is at hand; comparisons with the
# reference model pass tests.rounding.tolerance(model, x) instead, derived from float32's
# rounding on that model (~1e-7 on the tiny variant).
TOLERANCE = 1e-5


def tiny_torch_model(seed: int = 0, deploy: bool = False, **overrides) -> tr.RepMLPNet:
  """The reference model with random weights and BatchNorms far from identity, in eval mode."""
  torch.manual_seed(seed)
  model = tr.create_repmlpnet_custom(**{**TINY, **overrides}, num_classes=TINY_CLASSES)
  model = tr.randomize_bn_(model, seed=seed + 1).eval()
  return model.to_deploy() if deploy else model


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
  return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return model(x).numpy()


def flax_logits(model, variables, x: torch.Tensor) -> np.ndarray:
  """Eval-mode logits of the Flax model (jitted) on the NCHW torch images."""
  x = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  return np.asarray(jit_apply(model)(variables, x))


def assert_logits_match(expected: np.ndarray, actual: np.ndarray,
                        tolerance: float = TOLERANCE) -> None:
  err = helpers.relative_error(expected, actual)
  assert err <= tolerance, f'relative error {err:.3g} > {tolerance:.3g}'


class FakeYacs:
  """Registers a stand-in `yacs.config.CfgNode` (torch.save pickles classes by module path).

  Its `__setstate__` leaves a marker file: ordinary unpickling runs it, a safe loader must not.
  """

  def __init__(self, monkeypatch, marker):
    marker = str(marker)

    class CfgNode(dict):
      """Stand-in for yacs' config class (a dict with attribute state)."""

      def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__['__immutable__'] = False
        self.__dict__['__deprecated_keys__'] = set()

      def __setstate__(self, state):
        open(marker, 'w').close()
        self.__dict__.update(state)

    CfgNode.__module__ = 'yacs.config'
    CfgNode.__qualname__ = 'CfgNode'
    yacs, config = types.ModuleType('yacs'), types.ModuleType('yacs.config')
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, 'yacs', yacs)
    monkeypatch.setitem(sys.modules, 'yacs.config', config)
    self.CfgNode = CfgNode

  def config(self):
    """A nested config like the authors' (MODEL.ARCH, TRAIN.BASE_LR, ...)."""
    return self.CfgNode({'MODEL': self.CfgNode({'ARCH': 'RepMLPNet-B224', 'NUM_CLASSES': 1000}),
                         'TRAIN': self.CfgNode({'BASE_LR': 0.001, 'EPOCHS': 100})})


def training_checkpoint(state_dict, config, **extra):
  """The authors' training checkpoint layout (main.py's save_checkpoint)."""
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3).state_dict()
  return {'model': state_dict, 'optimizer': optimizer, 'lr_scheduler': {'last_epoch': 99},
          'max_accuracy': 80.32, 'epoch': 99, 'config': config, **extra}


_JITTED = {}


def jit_apply(model):
  """A jitted eval-mode apply for `model`, compiled once per distinct model in a test process."""
  key = repr(model)  # Every setting of the module.
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda variables, x: model.apply(variables, x))
  return _JITTED[key]
