"""RepMLPNet-T256 on ImageNet-1k, the official recipe (100 epochs, batch 256, AdamW, mixup/CutMix).

    python train.py --config imagenet_t256 --workdir /ckpt/repmlpnet_t256 \
        --config.data_dir=/data/tfds

See train.py for data preparation, multi-host runs and resuming. The official weights of this
variant reach 77.44% top-1 (trained at batch 256; the lr scales with --config.global_batch_size).
"""

from configs import common


def get_config():
  """RepMLPNet-T256, train and test at 256x256."""
  config = common.get_config()
  config.model = 'RepMLPNet-T256'
  config.image_size = 256
  config.eval_image_size = 256
  config.bn_group_size = 32  # The authors' per-GPU batch (8 GPUs x 32).
  return config
