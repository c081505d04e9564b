"""Mixup / CutMix with label smoothing in JAX, timm's `Mixup(mode='batch')` as a pure function.

Runs inside the jitted train step (static shapes, no host round trip). Per batch, as timm:
with probability `prob` mix, else keep the batch (labels are still smoothed); when mixing, use
CutMix with probability `switch_prob` (only if both alphas are > 0), lambda ~ Beta(alpha, alpha)
of the chosen method. Example i is mixed with example N-1-i (the flipped batch). CutMix pastes
a box of side int(H*sqrt(1-lambda)) x int(W*sqrt(1-lambda)) centred uniformly and clipped at
the border, and corrects lambda to the kept area (timm's correct_lam=True). Targets:
lambda * smooth(y) + (1 - lambda) * smooth(y_flipped), smooth(t) = t * (1 - s) + s / C.

Official recipe: mixup_alpha 0.4, cutmix_alpha 1.0, prob 1.0, switch_prob 0.5, smoothing 0.1.
"""

import jax
import jax.numpy as jnp


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.4,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its flipped self; returns (images, soft targets).

  Args:
    rng: PRNG key; fold the step in for a per-step draw.
    images: (N, H, W, C) floating.
    labels: (N,) integer class ids, or (N, num_classes) one-hot / soft targets.
    num_classes: number of classes C.
    mixup_alpha: Beta parameter of mixup; 0 disables mixup.
    cutmix_alpha: Beta parameter of CutMix; 0 disables CutMix.
    switch_prob: probability of CutMix instead of mixup when both are enabled.
    prob: probability of mixing this batch at all.
    label_smoothing: s in smooth(t) = t * (1 - s) + s / num_classes.

  Returns:
    images: (N, H, W, C), same dtype; targets: (N, num_classes) float32, rows summing to 1.
  """
  if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be floating (N, H, W, C), got {images.dtype} {images.shape}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  if labels.shape not in ((images.shape[0],), (images.shape[0], num_classes)):
    raise ValueError(f'labels must be ({images.shape[0]},) class ids or ({images.shape[0]}, '
                     f'{num_classes}) one-hot, got shape {labels.shape}.')
  if mixup_alpha < 0 or cutmix_alpha < 0 or not mixup_alpha + cutmix_alpha > 0:
    raise ValueError('mixup_alpha and cutmix_alpha must be >= 0 and not both 0, got '
                     f'{mixup_alpha}, {cutmix_alpha}; without mixing, smooth the labels alone.')
  for arg_name, value in (('switch_prob', switch_prob), ('prob', prob),
                          ('label_smoothing', label_smoothing)):
    if not 0 <= value <= 1:
      raise ValueError(f'{arg_name} must be in [0, 1], got {value}.')

  if labels.ndim == 1:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes

  apply_key, switch_key, lam_key, box_key = jax.random.split(rng, 4)
  apply = jax.random.bernoulli(apply_key, prob)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(switch_key, switch_prob)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)  # Only the used method's is > 0.
  lam_drawn = jax.random.beta(lam_key, alpha, alpha)

  # One (H, W) map `keep` covers all cases: the share of the original image at each pixel.
  height, width = images.shape[1:3]
  cut = jnp.sqrt(1.0 - lam_drawn)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  centre_key_y, centre_key_x = jax.random.split(box_key)
  centre_y = jax.random.randint(centre_key_y, (), 0, height)
  centre_x = jax.random.randint(centre_key_x, (), 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = ((rows >= jnp.clip(centre_y - cut_h // 2, 0, height))
            & (rows < jnp.clip(centre_y + cut_h // 2, 0, height))
            & (cols >= jnp.clip(centre_x - cut_w // 2, 0, width))
            & (cols < jnp.clip(centre_x + cut_w // 2, 0, width)))
  cutmix_keep = 1.0 - in_box.astype(jnp.float32)
  keep = jnp.where(apply, jnp.where(use_cutmix, cutmix_keep, lam_drawn), 1.0)
  # CutMix's lambda is the kept area (timm's correct_lam); mixup's is the drawn one.
  lam = jnp.where(apply, jnp.where(use_cutmix, jnp.mean(cutmix_keep), lam_drawn), 1.0)

  keep_images = keep[None, :, :, None].astype(images.dtype)
  mixed = keep_images * images + (1 - keep_images) * images[::-1]
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
