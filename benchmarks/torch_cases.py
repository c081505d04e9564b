"""The PyTorch side of the benchmark: the authors' model (`tests/torch_reference.py`) and a matmul,
timed on CPU or CUDA in float32, TF32 or bfloat16 autocast.

Imported by `bench_models`; torch itself is imported lazily, so that the JAX figures need no torch.
"""

import contextlib
import functools
import time
from typing import Any, Callable, Sequence

from repmlp_jax.models import factory as models

WHATS = ('train_fwd', 'deploy_fwd', 'train_step')


def torch_or_none():
  """The torch module, or None when PyTorch is not installed."""
  try:
    import torch
  except ImportError:  # PyTorch is optional: JAX figures only.
    return None
  return torch


def torch_matmul(size: int, precision: str, device: str) -> tuple[Callable[[], Any], float]:
  """A (size x size) torch matmul in `precision` on `device` ('cpu' or 'cuda'); its FLOPs."""
  torch = torch_or_none()
  dtype = torch.bfloat16 if precision == 'bfloat16' else torch.float32
  a = torch.randn(size, size, device=device).to(dtype)
  b = torch.randn(size, size, device=device).to(dtype)

  def run():
    with torch_precision(precision, device):
      torch.matmul(a, b)
    _torch_sync(device)

  return run, 2.0 * size**3


@contextlib.contextmanager
def torch_precision(precision: str, device: str):
  """TF32 on or off (CUDA matmuls and convolutions), bfloat16 autocast for 'bfloat16'."""
  torch = torch_or_none()
  if device == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
    torch.backends.cudnn.allow_tf32 = precision == 'tf32'
  if precision == 'bfloat16':
    with torch.autocast(device, dtype=torch.bfloat16):
      yield
  else:
    yield


def _torch_sync(device: str) -> None:
  if device == 'cuda':
    torch_or_none().cuda.synchronize()


class TorchCase:
  """The authors' PyTorch model of one variant, batch size and precision, on CPU or CUDA."""

  def __init__(self, name: str, batch: int, precision: str = 'float32', device: str = 'cpu',
               whats: Sequence[str] = WHATS):
    torch = torch_or_none()
    from tests import torch_reference  # Needs the repository root on sys.path.
    settings = models.MODELS[models.resolve_name(name)][1]
    size = settings['image_size']

    def build():
      return torch_reference.create_repmlpnet_custom(
          settings['channels'], settings['depths'], settings['partitions'],
          settings['sharesets']).to(device)

    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % 1000
    self.stats: dict[str, float] = {}
    self.fns: dict[str, Callable[[], Any]] = {}
    sync = functools.partial(_torch_sync, device)

    def infer(m):
      with torch.inference_mode(), torch_precision(precision, device):
        m(x)
      sync()

    if {'train_fwd', 'deploy_fwd'} & set(whats):
      model = build().eval()
    if 'train_fwd' in whats:
      self.fns['train_fwd'] = lambda: infer(model)
    if 'deploy_fwd' in whats:
      start = time.perf_counter()
      deploy = model.to_deploy().eval()
      self.stats['reparam_s'] = time.perf_counter() - start
      self.fns['deploy_fwd'] = lambda: infer(deploy)
    if 'train_step' in whats:
      train_model = build().train()
      opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3, weight_decay=0.05)

      def run_step():
        opt.zero_grad(set_to_none=True)
        with torch_precision(precision, device):
          loss = torch.nn.functional.cross_entropy(train_model(x).float(), labels)
        loss.backward()
        opt.step()
        sync()

      self.fns['train_step'] = run_step
