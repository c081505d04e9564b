"""One small model per registered family, for tests that must cover every family quickly."""

import repmlp_jax

# Family name -> (model name, settings, input side).
SMALL_MODELS = {
    'RepMLPNet': ('_RepMLPNet-Tiny', dict(channels=(8, 16), depths=(1, 1), partitions=(4, 2),
                                          sharesets=(2, 4)), 32),
    'RepMLP-ResNet': ('_RepMLP-ResNet-Tiny', {}, 64),
    'PureMLPNet': ('RepMLP-CIFAR-PureMLP', dict(channels=(4, 8, 8), depths=(1, 1, 1),
                                                reparam_conv_k=(1, 3)), 32),
}


def create(family: str, num_classes: int):
  """(model, input side) of the family's small model."""
  name, settings, size = SMALL_MODELS[family]
  return repmlp_jax.create_model(name, num_classes=num_classes, **settings), size
