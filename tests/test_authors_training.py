"""Our training step against the authors' (tests/torch_training_reference.py), step by step.

A two-stage tiny RepMLPNet trained for three steps (two of warmup, one of cosine) from the same
initial variables on the same batch and soft targets, with BatchNorm groups of 4 images (their
per-GPU BatchNorm: 2 ranks of 4). Loss, gradient norm before clipping, learning rate, the
parameters and the running statistics (the mean over ranks; see README) after every step:

- float64 (jax_enable_x64, one device): relative 1e-10 (arrays: of max(largest entry, 1e-2)),
  the authors' AdamW eps 1e-8. Arrays that are zero in exact arithmetic (the biases of prebn2
  and of the FFN's last BatchNorm, whose shift every later BatchNorm removes, so their gradient
  vanishes; the running mean after a zero-mean input) hold rounding noise (1e-11), different
  on each side and amplified by Adam: they are compared absolutely, to 1e-10;
- float32 on the 8 simulated devices (each group of 4 images spans 4 devices) against the float64
  truth: relative 1e-6 on the loss, gradient norm and lr; parameters and statistics within 2e-5 of
  max(largest entry, 1e-2) per array. Here Adam's eps is 1e-3: some gradients are zero in exact
  arithmetic (the bias of prebn2, which feeds a 1x1 conv and then a training-mode BatchNorm that
  removes any shift) and float32 noise on them (1e-9) becomes a full-size Adam step of random
  sign with eps 1e-8.

Also: the learning rate of every step of the ImageNet schedule equals timm's CosineLRScheduler as
the authors build it (to 1e-12), and the authors' EMA rule step by step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import common
from configs import imagenet_b224
from configs import imagenet_b256
from configs import imagenet_d256
from configs import imagenet_l256
from configs import imagenet_t224
from configs import imagenet_t256
from repmlp_jax.pytorch import keys_repmlpnet
from repmlp_jax.train import ema
from repmlp_jax.train import experiment
from repmlp_jax.train import optim
from repmlp_jax.train import sharding
from tests import torch_reference
from tests import torch_training_reference as authors

NUM_CLASSES = 10
BATCH = 8
GROUP = 4
STEPS = experiment.Steps(per_epoch=2, total=6, warmup=2, eval_every=6, checkpoint_every=6,
                         log_every=1)
CLIP = 1.3  # Their 5 never acts on this model; 1.3 clips steps 0 and 2, not step 1.
TINY = dict(channels=(8, 16), depths=(1, 1), partitions=(4, 2), sharesets=(2, 4))


def _config(dtype, adam_eps):
  config = common.get_config()
  config.model = '_RepMLPNet-Tiny'
  config.model_overrides.update(TINY, dtype=dtype)
  config.image_size = config.eval_image_size = 32
  config.global_batch_size = BATCH
  config.lr_reference_batch = BATCH  # lr 1e-2 at this batch: steps large enough to check.
  config.base_lr, config.warmup_lr, config.min_lr = 1e-2, 1e-4, 1e-5
  config.bn_group_size = GROUP
  config.mixup_alpha = config.cutmix_alpha = 0.0  # Targets: the smoothed labels, known here.
  config.adam_eps = adam_eps
  config.grad_clip_norm = CLIP
  return config


def _batches():
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(BATCH, 32, 32, 3)),
           'label': rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)} for _ in range(3)]


def _torch_state(exp, state):
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return keys_repmlpnet.variables_to_torch(jax.device_get(variables), exp.model)


def _run(dtype, adam_eps, devices):
  """Three steps of ours and of the authors'; returns both histories."""
  config = _config(dtype, adam_eps)
  exp = experiment.Experiment(config, num_classes=NUM_CLASSES, steps=STEPS,
                              mesh=sharding.create_mesh(devices))
  state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                       exp.init_state())
  model = torch_reference.create_repmlpnet_custom(
      TINY['channels'], TINY['depths'], TINY['partitions'], TINY['sharesets'],
      num_classes=NUM_CLASSES).double()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64))
                         for k, v in _torch_state(exp, state).items()})
  trainer = authors.AuthorsTrainer(model, BATCH // GROUP, weight_decay=config.weight_decay,
                                   betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                                   clip_grad=config.grad_clip_norm)
  ours, theirs = [], []
  for step, batch in enumerate(_batches()):
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], NUM_CLASSES, dtype=jnp.float32),
                                  config.label_smoothing)  # What our step builds from labels.
    lr = authors.timm_cosine_lr(step, base_lr=config.base_lr, total_steps=STEPS.total,
                                warmup_steps=STEPS.warmup, warmup_lr_init=config.warmup_lr,
                                lr_min=config.min_lr)
    theirs.append(trainer.step(torch.from_numpy(batch['image'].transpose(0, 3, 1, 2)),
                               torch.from_numpy(np.asarray(targets, np.float64)), lr))
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    theirs[-1]['state'] = {**params, **{k: v.numpy() for k, v in trainer.mean_buffers().items()}}
    batch = {**batch, 'image': batch['image'].astype(dtype)}
    state, measurements = exp.train_step(state, sharding.global_batch(batch, exp.batch_sharding))
    ours.append({**jax.device_get(measurements), 'state': _torch_state(exp, state)})
  return ours, theirs


def _check(ours, theirs, scalar_tol, array_tol, floor, zero_below=0.0):
  """Scalars relative; arrays relative to max(largest entry, floor), or absolutely where the
  truth is below zero_below (zero in exact arithmetic: its value is rounding noise)."""
  worst = 0.0
  for step, (a, b) in enumerate(zip(ours, theirs)):
    for name in ('loss', 'grad_norm', 'lr'):
      err = abs(float(a[name]) - b[name]) / abs(b[name])
      assert err <= scalar_tol, f'step {step} {name}: {a[name]} vs {b[name]} ({err:.3g})'
    for key, want in b['state'].items():
      if key.endswith('num_batches_tracked'):
        continue
      got = np.asarray(a['state'][key], np.float64)
      scale = np.abs(want).max()
      err = np.abs(got - want).max() / (1.0 if scale < zero_below else max(scale, floor))
      worst = max(worst, err)
      assert err <= array_tol, f'step {step} {key}: relative error {err:.3g}'
  return worst


def test_three_steps_equal_the_authors_in_float64():
  with jax.enable_x64(True):
    ours, theirs = _run(jnp.float64, 1e-8, jax.devices()[:1])
  assert theirs[0]['lr'] == 1e-4 and theirs[2]['lr'] < 1e-2  # Warmup, then cosine.
  norms = [t['grad_norm'] for t in theirs]
  assert min(norms) < CLIP < max(norms)  # Steps with and without clipping.
  _check(ours, theirs, 1e-10, 1e-10, 1e-2, zero_below=1e-9)


def test_three_sharded_float32_steps_equal_the_authors_to_float32_rounding():
  assert jax.device_count() == 8
  ours, theirs = _run(jnp.float32, 1e-3, jax.devices())  # PyTorch in float64: the truth.
  _check(ours, theirs, 1e-6, 2e-5, 1e-2)


def test_imagenet_schedule_equals_timm_cosine_at_every_step():
  config = imagenet_b224.get_config()  # 100 epochs, 10 of warmup, batch 256.
  steps = experiment.derive_steps(config, num_train_examples=1_281_167)
  # The authors' lr_scheduler.py: int(epochs * steps per epoch); their loader per GPU holds
  # ceil(1281167 / 8) images in batches of 32 without the last partial one: 5004 steps.
  assert (steps.per_epoch, steps.total, steps.warmup) == (5004, 500_400, 50_040)
  scale = config.global_batch_size / 256
  kwargs = dict(base_lr=config.base_lr * scale, total_steps=steps.total,
                warmup_steps=steps.warmup, warmup_lr_init=config.warmup_lr * scale,
                lr_min=config.min_lr * scale)
  with jax.enable_x64(True):
    schedule = optim.learning_rate_schedule(config, total_steps=steps.total,
                                            warmup_steps=steps.warmup)
    ours = np.asarray(jax.jit(schedule)(jnp.arange(steps.total + 2)))
  assert ours.dtype == np.float64
  theirs = np.array([authors.timm_cosine_lr(t, **kwargs) for t in range(steps.total + 2)])
  # Relative 1e-12; near the end the lr tends to 0 (1 + cos(pi t / T) cancels), where both
  # agree to 1e-12 of the peak lr instead (measured: 6e-17 of it).
  np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * kwargs['base_lr'])


def test_authors_ema_rule_step_by_step():
  config = common.get_config()
  config.update(ema_alpha=0.01, ema_update_period=2, global_batch_size=16, warmup_epochs=2.0)
  per_epoch, total = 5, 30  # 6 epochs; updates at steps 0, 2, 4 of every epoch.
  rng = np.random.default_rng(0)
  initial = {'params': {'w': rng.normal(size=(3, 2))}, 'batch_stats': {'mean': rng.normal(size=2)}}
  ours = jax.tree.map(np.asarray, initial)
  theirs = {'w': torch.tensor(initial['params']['w']),
            'mean': torch.tensor(initial['batch_stats']['mean'])}
  weights = []
  with jax.enable_x64(True):
    for step in range(total):
      new = jax.tree.map(lambda a: a + rng.normal(size=a.shape), initial)
      ours = ema.update(config, ours, new, jnp.asarray(step), steps_per_epoch=per_epoch,
                        total_steps=total)
      authors.update_model_ema(
          theirs, {'w': torch.tensor(new['params']['w']),
                   'mean': torch.tensor(new['batch_stats']['mean'])},
          ema_alpha=0.01, update_period=2, global_batch=16, epochs=6, warmup_epochs=2.0,
          cur_epoch=step // per_epoch, cur_iter=step % per_epoch)
      np.testing.assert_allclose(ours['params']['w'], theirs['w'].numpy(), rtol=1e-14)
      np.testing.assert_allclose(ours['batch_stats']['mean'], theirs['mean'].numpy(), rtol=1e-14)
      weights.append(float(ema.new_weight(config, jnp.asarray(step), steps_per_epoch=per_epoch,
                                          total_steps=total)))
  alpha = 0.01 * (16 / 6 * 2)
  assert weights[:10] == [1.0, 0, 1.0, 0, 1.0] * 2  # Warmup epochs 0 and 1: copies.
  np.testing.assert_allclose(weights[10:15], [alpha, 0, alpha, 0, alpha], rtol=1e-15)


def test_ema_settings_are_checked():
  config = common.get_config()
  config.update(ema_decay=0.999, ema_alpha=1e-5)
  with pytest.raises(ValueError, match='either ema_decay .* or ema_alpha'):
    ema.check_config(config)


@pytest.mark.parametrize('module', [imagenet_t224, imagenet_b224, imagenet_t256, imagenet_b256,
                                    imagenet_d256, imagenet_l256])
def test_imagenet_configs_use_the_authors_batch_norm_groups(module):
  config = module.get_config()
  assert (config.bn_group_size, config.global_batch_size) == (32, 256)  # 8 GPUs x 32.
  assert (config.ema_decay, config.ema_alpha, config.ema_update_period) == (0.0, 0.0, 8)


def test_bn_group_size_must_divide_each_forward_batch():
  config = _config(jnp.float32, 1e-3)
  config.bn_group_size = 3
  with pytest.raises(ValueError, match='bn_group_size=3 does not divide the batch of 8'):
    experiment.Experiment(config, num_classes=NUM_CLASSES, steps=STEPS)
  config.bn_group_size = 8
  config.grad_accum_steps = 2  # Micro-batches of 4: groups must split each of them.
  one_device = sharding.create_mesh(jax.devices()[:1])  # 8 per device: accumulation itself fits.
  with pytest.raises(ValueError, match='bn_group_size=8 does not divide the batch of 4'):
    experiment.Experiment(config, num_classes=NUM_CLASSES, steps=STEPS, mesh=one_device)
