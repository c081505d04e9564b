"""The embedded default: a small RepMLPNet on scikit-learn's handwritten digits, no download.

    pip install -e '.[data]'
    python train.py --config digits --workdir /tmp/repmlp-digits

1438 training and 359 test images (8x8 gray, shipped inside scikit-learn), upsampled to 32x32 by
the input pipeline. Training is the ImageNet recipe scaled down: AdamW with masked weight decay,
warmup then cosine, clip 5, label smoothing; no mixup and no RandAugment (the pipeline's digits
recipe: pad + random crop, no flip).
"""

from configs import common


def get_config():
  """A 32x32 RepMLPNet (the test-size variant, widened) for a few minutes on 2 CPU cores."""
  config = common.get_config()
  config.model = '_RepMLPNet-Tiny'
  config.model_overrides.channels = (16, 32, 64, 64)
  config.model_overrides.sharesets = (2, 4, 8, 8)
  config.dtype = 'float32'  # A CPU run: bfloat16 brings no speed there.
  config.dataset = 'digits'
  config.image_size = 32
  config.eval_image_size = 32
  config.global_batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 30.0
  config.warmup_epochs = 2.0
  config.base_lr = 4e-3  # At the reference batch of 256: 1e-3 at batch 64.
  config.warmup_lr = 1e-5
  config.weight_decay = 0.05
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.eval_every_epochs = 10.0
  config.checkpoint_every_steps = 200
  config.log_every_steps = 20
  return config
