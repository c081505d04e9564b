"""Parameters and FLOPs of every model, training and deploy forms.

    python -m repmlp_jax.report                 # every official RepMLPNet variant
    python -m repmlp_jax.report b224 l256       # some of them
    python -m repmlp_jax.report --size 448 b224 # at another input size

FLOPs come from XLA's cost analysis of the jitted eval forward pass at batch 1 (nothing is
computed: the function is only lowered); MACs = FLOPs / 2, the unit the papers call FLOPs.
Parameters exclude BatchNorm running statistics, as the official counts do.
"""

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp

from repmlp_jax import model_io
from repmlp_jax.models import factory


def count_params(variables: Any) -> int:
  """Number of parameters (running statistics excluded)."""
  return sum(int(x.size) for x in jax.tree.leaves(variables['params']))


def forward_flops(model, size: int) -> float:
  """FLOPs of one eval forward pass on one (size, size) image, from XLA's cost analysis."""
  variables = model_io.abstract_variables(model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def model_report(name: str, size: int | None = None) -> dict[str, Any]:
  """Params and FLOPs of one model in both forms."""
  row = {'model': factory.resolve_name(name)}
  for deploy in (False, True):
    model = factory.create_model(name, deploy=deploy)
    side = size or model.image_size or factory.example_input_size(model)
    form = 'deploy' if deploy else 'train'
    row['size'] = side
    row[f'{form}_params'] = count_params(model_io.abstract_variables(model))
    row[f'{form}_gmacs'] = forward_flops(model, side) / 2e9
  return row


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('models', nargs='*', default=factory.available_models())
  parser.add_argument('--size', type=int, default=None,
                      help='input side (default: the training size)')
  args = parser.parse_args(argv)
  header = (f'{"model":<16} {"size":>5} {"train params":>14} {"train GMACs":>12} '
            f'{"deploy params":>14} {"deploy GMACs":>13}')
  print(header)
  for name in args.models:
    r = model_report(name, args.size)
    print(f'{r["model"]:<16} {r["size"]:>5} {r["train_params"]:>14,} {r["train_gmacs"]:>12.2f} '
          f'{r["deploy_params"]:>14,} {r["deploy_gmacs"]:>13.2f}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
