"""The jitted computations of training: state creation, the train step, evaluation counts, reparam.

`Experiment` binds a config, a model, its optimizer and a device mesh. The state is a plain
pytree {'params', 'batch_stats', 'opt_state', 'step', 'rng'} (plus 'ema' when
config.ema_decay or config.ema_alpha > 0, see train/ema.py), born sharded
(`jax.jit(init, out_shardings=...)`); the train step donates it and returns a dict of
measurements that stays on the devices until the caller pulls it.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from repmlp_jax.data import mixup
from repmlp_jax.models import batch_norm
from repmlp_jax.models import factory
from repmlp_jax.train import ema
from repmlp_jax.train import optim
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.train import sharding

State = dict[str, Any]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Steps:
  """The run's durations in steps, converted from the config's epochs (see derive_steps)."""
  per_epoch: int
  total: int
  warmup: int
  eval_every: int
  checkpoint_every: int
  log_every: int


def derive_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> Steps:
  """Converts every duration of the config to steps; the only place where this happens.

  Args:
    config: global_batch_size, num_epochs (or num_train_steps > 0), warmup_epochs,
      eval_every_epochs, checkpoint_every_steps, log_every_steps.
    num_train_examples: size of the training split (all processes together).
  Returns:
    Steps; fractional epochs round to the nearest step (at least 1 for cadences).
  """
  per_epoch = num_train_examples // config.global_batch_size
  if per_epoch < 1:
    raise ValueError(f'global_batch_size={config.global_batch_size} exceeds the '
                     f'{num_train_examples} training examples; use a smaller batch.')
  total = (config.num_train_steps if config.num_train_steps > 0
           else round(config.num_epochs * per_epoch))
  if total < 1:
    raise ValueError('The run has no training step: set num_epochs or num_train_steps > 0.')
  return Steps(per_epoch=per_epoch, total=total, warmup=round(config.warmup_epochs * per_epoch),
               eval_every=max(1, round(config.eval_every_epochs * per_epoch)),
               checkpoint_every=max(1, config.checkpoint_every_steps),
               log_every=max(1, config.log_every_steps))


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The training-form model the config names, with `model_overrides` as its settings."""
  overrides = {k: (tuple(v) if isinstance(v, list) else v)
               for k, v in config.model_overrides.to_dict().items()}
  compute = {'dtype': config.get('dtype', 'float32'), 'precision': config.get('precision')}
  model = factory.create_model(config.model, num_classes=num_classes, **{**compute, **overrides})
  for size_name in ('image_size', 'eval_image_size'):
    size = config[size_name]
    if size % model.input_multiple:
      raise ValueError(f'config.{size_name}={size} does not fit {config.model}: its side must be '
                       f'a multiple of {model.input_multiple}.')
  return model


def check_grad_accum(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Refuses a grad_accum_steps that does not split every device's share of the batch evenly."""
  k = config.get('grad_accum_steps', 1)
  per_device = config.global_batch_size // max(1, num_devices)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'config.grad_accum_steps must be a positive integer; got {k!r}.')
  if per_device % k:
    raise ValueError(
        f'config.grad_accum_steps={k} does not divide the per-device batch of {per_device} '
        f'(global_batch_size={config.global_batch_size} over {num_devices} devices); choose a '
        'divisor of it, or change global_batch_size.')


def _variables(tree: State) -> dict[str, Any]:
  return {'params': tree['params'], 'batch_stats': tree['batch_stats']}


def _top_k_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  hits = top == labels[:, None]
  mask = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return {'top1': jnp.sum(hits[:, 0] * mask), 'top5': jnp.sum(jnp.any(hits, axis=1) * mask),
          'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}


class Experiment:
  """The model, optimizer, mesh and jitted functions of one training run."""

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int, steps: Steps,
               mesh: Mesh | None = None):
    """Builds everything from the config (nothing is computed yet).

    Args:
      config: see configs/common.py.
      num_classes: size of the classifier (the data set's).
      steps: from derive_steps.
      mesh: default: every device, sharding.create_mesh().
    """
    self.config = config
    # What the jitted functions were built from, kept apart from `config`, which can change.
    self._config_json = config.to_json_best_effort(sort_keys=True)
    self.num_classes = num_classes
    self.steps = steps
    self.mesh = mesh or sharding.create_mesh()
    check_grad_accum(config, self.mesh.size)
    self.model = build_model(config, num_classes)
    ema.check_config(config)
    # Fails here, before any compile, when the groups do not split each forward pass's batch.
    batch_norm.num_groups(config.global_batch_size // config.get('grad_accum_steps', 1),
                          config.bn_group_size)
    self.deploy_model = self.model.clone(deploy=True)
    self.schedule = optim.learning_rate_schedule(config, total_steps=steps.total,
                                                 warmup_steps=steps.warmup)
    self.tx = optim.create_optimizer(config, self.schedule)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    abstract = jax.eval_shape(self._init)
    self.state_sharding = sharding.state_sharding(abstract, self.mesh, fsdp=config.fsdp,
                                                  min_size=config.fsdp_min_size)
    self.abstract_state = sharding.placed(abstract, self.state_sharding)
    self.init_state = jax.jit(self._init, out_shardings=self.state_sharding)
    self.train_step = jax.jit(self._train_step, donate_argnums=0,
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, self.replicated))
    # Evaluation reads whole weights on every device: with FSDP they are gathered once per
    # evaluation here rather than inside every batch's program.
    self.gather_variables = jax.jit(lambda tree: tree, out_shardings=self.replicated)
    self.reparam = jax.jit(functools.partial(reparameterize.reparam_variables, self.model))
    self.eval_counts = jax.jit(functools.partial(self._eval_counts, self.model))
    self.deploy_eval_counts = jax.jit(functools.partial(self._eval_counts, self.deploy_model))
    # The deploy form is evaluated as the Predictor serves it: its parameters in the compute
    # dtype, cast once per evaluation (cast in every batch's program, they cost the B224 deploy
    # forward ~2 MB of HBM traffic per image on TPU). Evaluation images come in the compute
    # dtype too (input_pipeline.create_split's image_dtype): rounded on the host exactly as the
    # model would round them on the device.
    self.deploy_variables = jax.jit(
        lambda variables: factory.cast_params(self.reparam(variables), self.model.dtype))
    self.eval_image_dtype = 'bfloat16' if self.model.dtype == jnp.bfloat16 else 'float32'

  def built_from(self, config: ml_collections.ConfigDict) -> bool:
    """Whether `config` equals the config this Experiment was built from (then it can run it)."""
    return self._config_json == config.to_json_best_effort(sort_keys=True)

  def _init(self) -> State:
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    size = self.config.image_size
    # Non-partitionable threefry: XLA compiles the many small initializers about 4x faster
    # (CPU: 31 s -> 8 s for the digits model), and the values still do not depend on how the
    # parameters are sharded.
    with jax.threefry_partitionable(False):
      variables = self.model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32))
    state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
             'opt_state': self.tx.init(variables['params']),
             'step': jnp.zeros((), jnp.int32), 'rng': train_rng}
    if ema.enabled(self.config):
      state['ema'] = _variables(variables)
    return state

  def _targets(self, rng: jax.Array, images: jax.Array, labels: jax.Array):
    c = self.config
    if c.mixup_alpha > 0 or c.cutmix_alpha > 0:
      return mixup.mixup_cutmix(rng, images, labels, num_classes=self.num_classes,
                                mixup_alpha=c.mixup_alpha, cutmix_alpha=c.cutmix_alpha,
                                switch_prob=c.mixup_switch_prob, prob=c.mixup_prob,
                                label_smoothing=c.label_smoothing)
    one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
    return images, optax.smooth_labels(one_hot, c.label_smoothing)

  def _loss_and_grads(self, params: Any, batch_stats: Any, images: jax.Array,
                      targets: jax.Array):
    def loss_fn(params):
      # BatchNorm groups of bn_group_size images (the authors' per-GPU BatchNorm), per forward.
      logits, updates = self.model.apply(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          bn_group_size=self.config.bn_group_size, mutable=['batch_stats'])
      # At least float32 (float64 kept: the step is compared with PyTorch's in float64).
      logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, batch_stats, grads

  def gradients(self, params: Any, batch_stats: Any, images: jax.Array, targets: jax.Array):
    """Loss and gradient of one global batch, over config.grad_accum_steps micro-batches.

    Micro-batch m holds the examples whose index is m modulo grad_accum_steps, so every device
    keeps its own share of each (no data moves). They run one after another (lax.scan), each
    with the BatchNorm statistics the previous one left; the gradients and losses are averaged.

    Args:
      params, batch_stats: the model's variables (float32).
      images: (B, H, W, 3); targets: (B, num_classes) probabilities.
    Returns:
      (mean loss, logits (B, num_classes) in batch order, new batch_stats, mean gradients).
    """
    k = self.config.get('grad_accum_steps', 1)
    if k == 1:
      return self._loss_and_grads(params, batch_stats, images, targets)
    micro_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))

    def split(x):  # (B, ...) -> (k, B / k, ...); row m is micro-batch m.
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def micro_step(carry, xs):
      grad_sum, stats = carry
      loss, logits, stats, grads = self._loss_and_grads(params, stats, *xs)
      return (jax.tree.map(jnp.add, grad_sum, grads), stats), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, batch_stats), (losses, logits) = jax.lax.scan(
        micro_step, (zeros, batch_stats), (split(images), split(targets)))
    logits = logits.swapaxes(0, 1).reshape(-1, logits.shape[-1])  # Back to batch order.
    return jnp.mean(losses), logits, batch_stats, jax.tree.map(lambda g: g / k, grad_sum)

  def _train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    images, targets = self._targets(rng, batch['image'], batch['label'])
    loss, logits, batch_stats, grads = self.gradients(state['params'], state['batch_stats'],
                                                      images, targets)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {**state, 'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state,
                 'step': step + 1}
    if 'ema' in state:
      new_state['ema'] = ema.update(self.config, state['ema'], _variables(new_state), step,
                                    steps_per_epoch=self.steps.per_epoch,
                                    total_steps=self.steps.total)
    measurements = {
        'loss': loss,
        # Against the un-mixed labels: a rough signal under mixup / CutMix.
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'lr': self.schedule(step),
        'grad_norm': optax.tree.norm(grads),  # Before clipping.
        # The change the step made to the parameters, taken from them: the norm of `updates`
        # itself kept that tree in HBM for a pass of its own (+37 MB per image, B224 on v5e),
        # and it differs from this one by float32 rounding only.
        'update_norm': optax.tree.norm(jax.tree.map(jnp.subtract, params, state['params'])),
        'param_norm': optax.tree.norm(params),
    }
    return new_state, measurements

  @staticmethod
  def _eval_counts(model: nn.Module, variables: Any, batch: Batch) -> dict[str, jax.Array]:
    logits = model.apply(variables, batch['image'], train=False)
    return _top_k_correct(logits, batch['label'], batch['mask'])

  def evaluate(self, state: State, batches) -> dict[str, float]:
    """Top-1 / top-5 and loss of the training form (eval mode) and of its reparam'd deploy form.

    Args:
      state: the training state.
      batches: iterable of global batches with 'image', 'label' and 'mask' (False on padding).
    Returns:
      {'top1', 'top5', 'loss', 'deploy_top1', 'deploy_top5', 'deploy_loss', 'count'} (+ 'ema_top1',
      'ema_top5', 'ema_loss' with EMA); accuracies are fractions over the unpadded examples.
    """
    gathered = self.gather_variables(_variables(state))
    forms = {'': (self.eval_counts, gathered),
             'deploy_': (self.deploy_eval_counts, self.deploy_variables(gathered))}
    if 'ema' in state:
      forms['ema_'] = (self.eval_counts, self.gather_variables(state['ema']))
    totals = {prefix: None for prefix in forms}
    for batch in batches:
      for prefix, (fn, variables) in forms.items():
        counts = fn(variables, batch)
        totals[prefix] = counts if totals[prefix] is None else jax.tree.map(
            jnp.add, totals[prefix], counts)
    if totals[''] is None:
      raise ValueError('The evaluation split gave no batch.')
    totals = jax.device_get(totals)
    count = float(totals['']['count'])
    metrics = {'count': count}
    for prefix, t in totals.items():
      metrics.update({f'{prefix}{k}': float(t[k]) / count for k in ('top1', 'top5', 'loss')})
    return metrics
