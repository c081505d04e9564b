"""The RepMLP paper's pure-MLP model on CIFAR-10 (arXiv 2105.01883 v1, Fig. 2; 91.11% top-1).

    pip install -e '.[data]'
    tfds build cifar10 --data_dir=$HOME/tensorflow_datasets   # once, on a machine with internet
    python train.py --config cifar10_pure_mlp --workdir /tmp/cifar10-pure-mlp \
        --config.data_dir=$HOME/tensorflow_datasets

The paper's recipe: 100 epochs, batch 128, cosine learning rate, padding to 40x40 + random 32x32
crop + horizontal flip (the input pipeline's CIFAR default). The paper does not name the
optimizer; SGD with momentum 0.9, lr 0.2 at batch 128 annealed to 0 and weight decay 1e-4 is
this config's reading. No mixup, RandAugment or label smoothing.
"""

from configs import common


def get_config():
  """RepMLP-CIFAR-PureMLP, 10 classes, the paper's CIFAR-10 recipe."""
  config = common.get_config()
  config.model = 'RepMLP-CIFAR-PureMLP'
  config.dtype = 'float32'  # Small enough for a CPU; --config.dtype=bfloat16 on TPU / GPU.
  config.dataset = 'cifar10'
  config.image_size = 32
  config.eval_image_size = 32
  config.global_batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 100.0
  config.warmup_epochs = 0.0
  config.optimizer = 'sgd'
  config.base_lr = 0.2
  config.lr_reference_batch = 128
  config.warmup_lr = 0.0
  config.min_lr = 0.0
  config.weight_decay = 1e-4
  config.grad_clip_norm = 0.0
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.eval_every_epochs = 5.0
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  return config
