"""Fine-tunes RepMLPNet-B224 from an imported checkpoint on your own images.

    python train.py --config finetune_b224 --workdir /ckpt/finetune_b224 \
        --config.init_from=/ckpt/repmlpnet_b224 \
        --config.dataset=image_folder --config.data_dir=/data/my_images

`init_from` is the training form of the same model in any format repmlp_jax.model_io.read_model
reads (e.g. the official training-time weights imported with convert.py, the released .pth
itself, or another run's workdir). Every
variable is loaded except the classifier when the number of classes differs (it starts fresh);
the optimizer starts fresh. On a rerun the workdir's own checkpoint wins over init_from.
`image_folder` reads <data_dir>/train/<class>/* and <data_dir>/val/<class>/*; any other data set
of the pipeline works too (--config.dataset=cifar10 --config.image_size=224 ...).
"""

from configs import common


def get_config():
  """Shorter schedule and a lower learning rate than training from scratch."""
  config = common.get_config()
  config.model = 'RepMLPNet-B224'
  config.init_from = '/path/to/orbax_dir'  # Override: --config.init_from=<dir>.
  config.dataset = 'image_folder'
  config.global_batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 30.0
  config.warmup_epochs = 1.0
  config.base_lr = 1e-4  # At batch 256.
  config.warmup_lr = 1e-7
  config.min_lr = 1e-6
  config.weight_decay = 0.05
  config.mixup_alpha = 0.2
  config.cutmix_alpha = 0.0
  return config
