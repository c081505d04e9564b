"""The RepMLPNet authors' training step in PyTorch: ground truth for the step-by-step tests.

Written from their training code (DingXiaoH/RepMLP: main_repmlp.py, optimizer.py,
lr_scheduler.py, utils.py) and the timm pieces it uses (CosineLRScheduler,
SoftTargetCrossEntropy); none of their code is copied.

- AdamW with two parameter groups: weight decay on every parameter of more than one dimension
  whose name does not end in `.bias`, none on the others (every BatchNorm parameter and bias).
- Loss: soft-target cross-entropy, sum over classes of -target * log_softmax, mean over images.
- `clip_grad_norm_(parameters, max_norm)`; its return value (the norm before clipping) is the
  logged grad_norm.
- Learning rate per step from timm's CosineLRScheduler(t_initial=total steps, lr_min,
  warmup_lr_init, warmup_t=warmup steps, cycle_limit=1, t_in_epochs=False).
- DistributedDataParallel over `world_size` GPUs with plain BatchNorm and
  broadcast_buffers=False: each rank runs the model on its consecutive slice of the batch
  (BatchNorm statistics over that slice; its own running statistics), and the gradients are
  averaged over the ranks. Emulated in one process with one model copy per rank.
- Their EMA (`update_model_ema`), on state_dicts.
"""

import copy
import math

import torch
import torch.nn.functional as F


def timm_cosine_lr(t: int, *, base_lr: float, total_steps: int, warmup_steps: int,
                   warmup_lr_init: float, lr_min: float) -> float:
  """CosineLRScheduler._get_lr(t) for one cycle without noise, as the authors build it."""
  if t < warmup_steps:
    return warmup_lr_init + t * ((base_lr - warmup_lr_init) / warmup_steps)
  if t // total_steps >= 1:  # Past the single cycle (cycle_limit=1).
    return lr_min
  return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * t / total_steps))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
  """optimizer.py's set_weight_decay: no decay on 1-D parameters and biases."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim == 1 or name.endswith('.bias') else decay).append(p)
  return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class AuthorsTrainer:
  """One model trained as on `world_size` DDP ranks (each rank a copy with its own buffers)."""

  def __init__(self, model: torch.nn.Module, world_size: int, *, weight_decay: float,
               betas: tuple[float, float], eps: float, clip_grad: float):
    self.model = model
    self.ranks = [model] + [copy.deepcopy(model) for _ in range(world_size - 1)]
    self.optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=0.0,
                                       betas=betas, eps=eps, weight_decay=weight_decay)
    self.clip_grad = clip_grad

  def step(self, images: torch.Tensor, targets: torch.Tensor, lr: float) -> dict[str, float]:
    """One training step on the global batch; returns the mean loss over ranks and grad_norm."""
    with torch.no_grad():  # DDP keeps the parameters of every rank equal.
      for replica in self.ranks[1:]:
        for p, q in zip(replica.parameters(), self.model.parameters()):
          p.copy_(q)
    n = len(self.ranks)
    losses, grads = [], None
    for replica, x, t in zip(self.ranks, images.chunk(n), targets.chunk(n)):
      replica.train()
      replica.zero_grad()
      loss = soft_target_cross_entropy(replica(x), t)
      loss.backward()
      losses.append(loss.item())
      rank_grads = [p.grad for p in replica.parameters()]
      grads = rank_grads if grads is None else [a + b for a, b in zip(grads, rank_grads)]
    for p, g in zip(self.model.parameters(), grads):  # DDP's all-reduce: the mean over ranks.
      p.grad = g / n
    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
    for group in self.optimizer.param_groups:
      group['lr'] = lr
    self.optimizer.step()
    return {'loss': sum(losses) / n, 'grad_norm': grad_norm.item(), 'lr': lr}

  def mean_buffers(self) -> dict[str, torch.Tensor]:
    """Running statistics averaged over the ranks (rank 0's alone are what the authors save)."""
    out = {}
    for name, _ in self.model.named_buffers():
      if not name.endswith('num_batches_tracked'):
        values = [dict(r.named_buffers())[name] for r in self.ranks]
        out[name] = sum(values) / len(values)
    return out


def update_model_ema(ema: dict, model: dict, *, ema_alpha: float, update_period: int,
                     global_batch: int, epochs: int, warmup_epochs: float, cur_epoch: int,
                     cur_iter: int) -> None:
  """utils.py's update_model_ema on state_dicts, in place; cur_iter counts within the epoch."""
  if not update_period or cur_iter % update_period:
    return
  alpha = min(1.0, ema_alpha * (global_batch / epochs * update_period))
  if cur_epoch < warmup_epochs:
    alpha = 1.0
  for name, value in ema.items():
    value.copy_(value * (1.0 - alpha) + model[name] * alpha)
