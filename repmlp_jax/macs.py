"""Multiply-accumulates of a RepMLPNet forward, counted from the layer shapes.

The papers' convention: every conv and fully connected layer counts (output elements x inputs
per output); BatchNorm, activations, pooling and additions do not. RepMLPNet-T224 comes to
2.80 G, B224 to 6.66 G in the deploy form (the paper: 2.8 B and 6.7 B). XLA's own count is no
substitute on GPU, where its cost analysis leaves out cuBLAS/cuDNN calls.
"""

from repmlp_jax.models import layers
from repmlp_jax.models import repmlpnet


def macs_per_image(model: repmlpnet.RepMLPNet, image_size: int | None = None) -> int:
  """MACs of one image through `model` (either form; the training form adds its conv branches).

  Args:
    model: a RepMLPNet.
    image_size: the square input side; default the model's training resolution.
  Returns:
    The count, an int.
  """
  size = image_size or model.image_size or model.input_multiple
  side = size // 4
  macs = side * side * model.channels[0] * 3 * 4 * 4  # Stem: 4x4 conv, stride 4.
  for s, (c, depth, p, shareset) in enumerate(
      zip(model.channels, model.depths, model.partitions, model.sharesets)):
    if s > 0:
      side //= 2
      macs += side * side * c * model.channels[s - 1] * 2 * 2  # 2x2 conv, stride 2.
    positions, hidden = side * side, layers.make_divisible(c // 4, model.gp_hidden_divisor)
    unit = 2 * c * hidden  # Global Perceptron: fc1, fc2 on the pooled vector.
    unit += positions * c * p * p  # fc3: each output reads the h*w values of its window row.
    if not model.deploy:  # Local Perceptron: a k x k depthwise conv per branch.
      unit += sum(positions * c * k * k for k in model.reparam_conv_k)
    unit += 2 * positions * c * c * model.ffn_expand  # FFN: two 1x1 convs.
    macs += depth * unit
  return macs + model.channels[-1] * model.num_classes  # Head.
