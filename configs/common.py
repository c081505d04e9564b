"""Shared defaults of every experiment: the official RepMLPNet ImageNet recipe.

Each experiment file calls `get_config()` and changes what differs. Durations are in epochs
(fractions allowed) and become steps in one place, `repmlp_jax.train.experiment.derive_steps`;
`num_train_steps > 0` replaces `num_epochs` (short runs, tests). Learning rates are given for a
global batch of `lr_reference_batch` images and scaled linearly by the global batch size (the
base lr, the warmup start and the final lr alike), as the official code does.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The official recipe (REFERENCE section 3) on ImageNet with RepMLPNet-B224."""
  config = ml_collections.ConfigDict()

  # Model: any name create_model knows; model_overrides are passed on as its settings.
  config.model = 'RepMLPNet-B224'
  config.model_overrides = ml_collections.ConfigDict()
  # Start from a training-form model in any format repmlp_jax.model_io.read_model reads (an
  # imported directory, a hub directory, a .pth, another run's workdir); a deploy-form model
  # cannot be trained. The head starts fresh when its size differs.
  config.init_from = config_dict.placeholder(str)
  # Compute dtype of every convolution, matmul and activation: 'bfloat16' (TPU / GPU) or
  # 'float32'. Parameters, optimizer state, BatchNorm statistics and their mean / variance
  # reductions, softmax and the loss stay float32 (no loss scaling). Checkpoints hold float32.
  config.dtype = 'bfloat16'
  # Of every dot and convolution: 'default' (the backend's fastest: TF32 on recent NVIDIA GPUs,
  # bfloat16 passes on TPU), 'high', 'highest' (full float32). README: Numerics on accelerators.
  config.precision = 'default'
  # JAX's persistent compilation cache: None = $XDG_CACHE_HOME/repmlp_jax/jax_cache (or
  # ~/.cache/...), a path = there, '' = off. A second start of the same config compiles nothing.
  config.compilation_cache_dir = config_dict.placeholder(str)
  # TensorBoard event files in <workdir>/tensorboard beside metrics.jsonl (tf.summary; on a gs://
  # workdir through TensorFlow's own GCS client).
  config.tensorboard = True

  # Data (repmlp_jax.data.input_pipeline): 'imagenet2012', 'cifar10', 'cifar100', 'image_folder',
  # 'digits'. image_size: training crop; eval_image_size: test resize + center crop side.
  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)
  config.image_size = 224
  config.eval_image_size = 224
  # Fields of repmlp_jax.data.preprocess.Preprocess replacing the data set's default recipe.
  config.preprocess_overrides = ml_collections.ConfigDict()
  config.shuffle_buffer = 16_384
  # 'grpc://host:port' of a tf.data service dispatcher: training preprocessing runs on its
  # workers (python -m repmlp_jax.data.service; README, Input pipeline). Evaluation stays local.
  config.data_service_address = config_dict.placeholder(str)

  # Batches are global (all devices of all hosts together).
  config.global_batch_size = 256
  # Each device's share of the global batch is run as this many micro-batches whose gradients
  # are averaged before one optimizer update (same lr, same global batch). BatchNorm statistics
  # are computed per micro-batch, as on a smaller batch.
  config.grad_accum_steps = 1
  config.eval_batch_size = 256
  config.seed = 0

  # Schedule: linear warmup from warmup_lr, then cosine per step to min_lr (timm's
  # CosineLRScheduler with t_in_epochs=False, as the official code).
  config.num_epochs = 100.0
  config.num_train_steps = -1
  config.warmup_epochs = 10.0
  config.base_lr = 1e-3
  config.warmup_lr = 5e-7
  config.min_lr = 0.0
  config.lr_reference_batch = 256

  # AdamW; no weight decay on 1-D parameters (every BatchNorm parameter, every bias).
  # optimizer = 'sgd' uses sgd_momentum / sgd_nesterov and L2 weight decay instead.
  config.optimizer = 'adamw'
  config.sgd_momentum = 0.9
  config.sgd_nesterov = False
  config.weight_decay = 0.1
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.grad_clip_norm = 5.0  # Global norm; <= 0 disables.

  # Targets: label smoothing through mixup / CutMix (per batch, timm's mode='batch').
  # mixup_alpha = cutmix_alpha = 0 turns mixing off (labels are still smoothed).
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.4
  config.cutmix_alpha = 1.0
  config.mixup_switch_prob = 0.5
  config.mixup_prob = 1.0

  # Exponential moving average of the weights, evaluated besides the model (0 = off, official).
  config.ema_decay = 0.0
  # Or the authors' EMA (their TRAIN.EMA_ALPHA, off in their recipe; repmlp_jax/train/ema.py):
  # every ema_update_period steps, weight min(1, ema_alpha * global_batch / epochs * period)
  # on the new weights; a copy during warmup. At most one of ema_decay, ema_alpha is > 0.
  config.ema_alpha = 0.0
  config.ema_update_period = 8

  # BatchNorm statistics in training: per group of bn_group_size consecutive images of each
  # forward pass (the authors' per-GPU BatchNorm: 32 images on each of 8 GPUs; the ImageNet
  # configs set 32); 0 = over the whole batch (a synchronized BatchNorm).
  config.bn_group_size = 0

  # Sharding: data-parallel over every device; with fsdp (the default) the parameters and the
  # optimizer state whose size is at least fsdp_min_size elements are also split along the
  # 'data' axis (each device updates its share, the forward gathers the weights, evaluation
  # gathers them once). On TPU this takes B224's step from 923 to 775 MB of HBM traffic per
  # image (v5e-4; benchmarks/README.md); fsdp = False keeps a full copy of the state on every
  # device. One device: no difference.
  config.fsdp = True
  config.fsdp_min_size = 2**10

  # Compile train.py's programs for this TPU target instead of training ('v5e-4', 'v5p-128',
  # 'v6e-8', or a chip grid 'v5e:2x2'; README: Before you rent a pod): any machine, no TPU, no
  # data read; writes <workdir>/compile_report.json, prints the HBM, FLOPs and bytes per chip,
  # and exits 2 when a program does not fit.
  config.compile_topology = config_dict.placeholder(str)
  # 'START,END': a jax.profiler trace of training steps START to END (1-based, both included)
  # into <workdir>/profile/, for TensorBoard's profile plugin or xprof; every host writes its own.
  config.profile_steps = config_dict.placeholder(str)

  # Cadence.
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config
