"""Training numerics against independent truths: the train-mode forward and BatchNorm batch
means against PyTorch's; the soft-target loss, the AdamW update with its decay mask and the
gradient clipping against their formulas written out in numpy; the EMA evaluation.

The BatchNorm running *variance* update is left out here: PyTorch updates it with the unbiased
batch variance, and that comparison lives with the step-by-step training comparison against
PyTorch (tests of the train step).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import repmlp_jax
from repmlp_jax.pytorch import keys_repmlpnet as keys
from repmlp_jax.train import experiment
from repmlp_jax.train import optim
from repmlp_jax.train import sharding
from tests import helpers
from tests import rounding
from tests import test_train_steps as ts
from tests import torch_checkpoints as tc


def _torch_train_forward(torch_model, x):
  """Train-mode logits and the updated state_dict of a copy of `torch_model` (float32, float64)."""
  out = {}
  for dtype in (torch.float32, torch.float64):
    model = copy.deepcopy(torch_model).to(dtype).train()
    with torch.no_grad():
      logits = model(x.to(dtype)).numpy()
    out[dtype] = (logits, {k: v.numpy() for k, v in model.state_dict().items()})
  return out


def test_train_mode_forward_and_batch_means_match_pytorch():
  torch_model = tc.tiny_torch_model(seed=21)
  x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(22))
  ref = _torch_train_forward(torch_model, x)
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  apply = jax.jit(lambda v, im: model.apply(v, im, train=True, mutable=['batch_stats']))
  logits, updates = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  # Bound: 8x PyTorch's own float32 rounding of the train-mode forward (tests/rounding.py).
  logits32, logits64 = ref[torch.float32][0], ref[torch.float64][0]
  bound = rounding.tolerance_from(logits64, logits32)
  err = helpers.relative_error(logits32, np.asarray(logits))
  assert err <= bound, f'train-mode logits: {err:.3g} > {bound:.3g}'
  # Running means: 0.9 * old + 0.1 * batch mean in both (momentum 0.1 = Flax's 0.9), for every
  # BatchNorm, fc3_bn of the last stage included (its statistics run over the batch alone).
  ours = keys.variables_to_torch({'params': variables['params'],
                                  'batch_stats': jax.device_get(updates['batch_stats'])}, model)
  means = [k for k in ours if k.endswith('running_mean')]
  assert len(means) == 1 + 5 * 7 + 3 + 1  # stem, 5 units x 7, 3 embeds, head_norm
  for key in means:
    old = torch_model.state_dict()[key].numpy()
    want32, want64 = ref[torch.float32][1][key], ref[torch.float64][1][key]
    assert not np.allclose(want32, old), key  # The statistics did move.
    scale = np.abs(want64).max()
    bound = rounding.FACTOR * max(np.abs(want64 - want32).max() / scale, rounding.FLOAT32_EPS)
    err = np.abs(ours[key] - want32).max() / scale
    assert err <= bound, f'{key}: {err:.3g} > {bound:.3g}'


@pytest.fixture(scope='module', name='exp')
def _exp():
  """Label smoothing without mixup (soft targets of a known form) and an EMA, on one device."""
  config = ts.tiny_config(label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, ema_decay=0.5)
  return experiment.Experiment(config, num_classes=ts.NUM_CLASSES, steps=ts.tiny_steps(),
                              mesh=sharding.create_mesh(jax.devices()[:1]))


def test_soft_target_cross_entropy_is_the_formula(exp):
  state = exp.init_state()
  batch = ts.global_batches(1)[0]
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  logits, _ = jax.jit(lambda v, im: exp.model.apply(v, im, train=True, mutable=['batch_stats']))(
      variables, batch['image'])
  logits = np.asarray(logits, np.float64)
  targets = np.full((ts.GLOBAL_BATCH, ts.NUM_CLASSES), 0.1 / ts.NUM_CLASSES)
  targets[np.arange(ts.GLOBAL_BATCH), batch['label']] += 0.9
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  expected = float(np.mean(-(targets * log_softmax).sum(-1)))
  _, measurements = exp.train_step(state, batch)
  # float32 log-softmax over 10 classes: a few ulps of a loss ~2.3.
  np.testing.assert_allclose(float(measurements['loss']), expected, rtol=1e-6)


def _adamw_reference(params, grads, lr, config, clip):
  """One AdamW step from zero moments, written out: clip, moments, bias correction, decay."""
  norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))
  factor = min(1.0, clip / norm) if clip > 0 else 1.0
  out = {}
  for k, p in params.items():
    g = grads[k].astype(np.float64) * factor
    m = (1 - config.adam_b1) * g / (1 - config.adam_b1)  # m_1 / (1 - b1^1)
    v = (1 - config.adam_b2) * g * g / (1 - config.adam_b2)
    update = m / (np.sqrt(v) + config.adam_eps)
    if p.ndim > 1:  # Decoupled decay on kernels only.
      update = update + config.weight_decay * p
    out[k] = p - lr * update
  return out


@pytest.mark.parametrize('clip', [0.0, 0.05])
def test_adamw_with_decay_mask_and_clipping_is_the_formula(clip):
  config = ts.tiny_config(weight_decay=0.3, grad_clip_norm=clip, adam_eps=1e-8)
  lr = 0.01
  tx = optim.create_optimizer(config, lambda step: lr)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
            'bias': rng.normal(size=(4,)).astype(np.float32),
            'scale': rng.normal(size=(4,)).astype(np.float32)}
  grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  got = optax.apply_updates(params, updates)
  expected = _adamw_reference(params, grads, lr, config, clip)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
  assert clip == 0.0 or norm > 10 * clip  # The clipping is active when asked for.
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=2e-6, atol=1e-7, err_msg=k)
  # The first Adam step is ~lr * sign(g); the kernels' decay moves them further.
  assert not np.allclose(got['kernel'], params['kernel'] - lr * np.sign(grads['kernel']))


def test_ema_evaluation_uses_the_ema_weights(exp):
  state = exp.init_state()
  for batch in ts.global_batches(2):
    state, _ = exp.train_step(state, batch)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, ts.NUM_CLASSES, 8).astype(np.int32)
  batch = {'image': images, 'label': labels, 'mask': np.array([True] * 7 + [False])}
  metrics = exp.evaluate(state, [batch])
  logits = np.asarray(jax.jit(exp.model.apply)(state['ema'], images), np.float64)[:7]
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  np.testing.assert_allclose(metrics['ema_loss'], -np.mean(log_p[np.arange(7), labels[:7]]),
                             rtol=1e-5)
  assert metrics['ema_top1'] == np.mean(np.argmax(logits, -1) == labels[:7])
  # The EMA weights are not the trained ones, so their loss differs from the model's.
  assert metrics['ema_loss'] != pytest.approx(metrics['loss'], rel=1e-6)
