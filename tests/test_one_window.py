"""One window per stage (every official variant at its training resolution): the RepMLP block
stays (N, H, W, C) instead of permuting its input into partition rows. Against the authors' code
in float64, for a model whose every stage is one window: the training-mode forward, the new
BatchNorm statistics and every parameter's gradient, the eval forward and the deploy forward.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch

import repmlp_jax
from repmlp_jax.pytorch import keys_repmlpnet as keys
from tests import helpers
from tests import torch_reference as tr

# At 32 x 32 the stages' maps are 8, 4, 2, 1: one window each, several channel blocks (C/S > 1).
# Stages 2 and 3 have more than 4 sharesets: the deploy form merges their spatial axes.
ONE_WINDOW = dict(channels=(8, 16, 16, 32), depths=(1, 1, 2, 1), hs=(8, 4, 2, 1),
                  sharesets=(2, 4, 8, 8))


def _load(torch_model):
  """The imported model and variables in float64 (call under jax.enable_x64)."""
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  return (model.clone(dtype=jnp.float64, precision='highest'),
          jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables))


def _torch_model():
  torch.manual_seed(5)
  model = tr.create_repmlpnet_custom(**ONE_WINDOW, num_classes=7)
  # Rounded to float32 first: the importer keeps float32 variables (as flax's param_dtype), and
  # the float64 comparison must see the same values on both sides.
  return tr.randomize_bn_(model, seed=6).float().double()


def test_training_step_quantities_match_the_authors_code_in_float64():
  torch_model = _torch_model().train()
  x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
  weights = torch.randn(4, 7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
  with jax.enable_x64(True):
    model, variables = _load(torch_model)
    assert all(p == s for p, s in zip(model.partitions, (8, 4, 2, 1)))
    reference = copy.deepcopy(torch_model)
    logits_t = reference(x)
    (logits_t * weights).sum().backward()

    def loss(params, images):
      logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                    mutable=['batch_stats'])
      return jnp.sum(logits * jnp.asarray(weights.numpy())), (logits, updates['batch_stats'])

    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    grads, (logits, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'], images)
    assert helpers.relative_error(logits_t.detach().numpy(), logits) <= 1e-10
    ours_stats = keys.variables_to_torch({'params': variables['params'], 'batch_stats': stats},
                                         model)
    ours_grads = keys.variables_to_torch({'params': grads, 'batch_stats': stats}, model)
  state = reference.state_dict()
  torch_grads = {k: p.grad.numpy() for k, p in reference.named_parameters()}
  assert set(torch_grads) < set(ours_grads)
  # All gradients as one vector to 1e-10; each on its own to 1e-8 of its largest entry (a small
  # gradient summed from large cancelling terms, such as a 1x1 branch's kernel behind
  # BatchNorms, keeps a relative rounding error near 1e-10 in float64; some are zero but for
  # rounding), while a wrong formula is off by order one.
  names = sorted(torch_grads)
  want, got = (np.concatenate([g[k].ravel() for k in names]) for g in (torch_grads, ours_grads))
  assert helpers.relative_error(want, got) <= 1e-10
  floor = 1e-6 * np.abs(want).max()
  for key in names:
    error = np.abs(torch_grads[key] - ours_grads[key]).max()
    assert error <= 1e-8 * max(np.abs(torch_grads[key]).max(), floor), key
  for key in state:
    if key.endswith(('running_mean', 'running_var')):
      assert helpers.relative_error(state[key].numpy(), ours_stats[key]) <= 1e-10, key


def test_eval_and_deploy_forwards_match_the_authors_code_in_float64():
  torch_model = _torch_model().eval()
  x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
  with torch.no_grad():
    want = torch_model(x).numpy()
  with jax.enable_x64(True):
    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    model, variables = _load(torch_model)
    deploy_model, deploy_variables = repmlp_jax.reparam(model, variables)
    logits = jax.jit(model.apply)(variables, images)
    deploy_logits = jax.jit(deploy_model.apply)(deploy_variables, images)
  assert helpers.relative_error(want, logits) <= 1e-10
  assert helpers.relative_error(want, deploy_logits) <= 1e-10
