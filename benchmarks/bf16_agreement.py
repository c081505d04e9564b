"""Accuracy cost of bfloat16 inference: agreement with float32 logits on a reference batch.

    python -m benchmarks.bf16_agreement --checkpoint ckpt/b224 img1.jpg img2.jpg ...
    python -m benchmarks.bf16_agreement --model b224 --num-images 32    # random weights

Runs the same deploy-form Predictor in float32 and in bfloat16 (parameters and compute) and
prints the top-1 agreement, the top-5 overlap, and max |logit difference| relative to
max |float32 logit|. Without a checkpoint the weights are random (BatchNorm statistics drawn far
from identity with --randomize-bn, as in the tests) and the images are Gaussian noise: a
statement about numeric drift more than about accuracy, since near-uniform logits flip easily.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import repmlp_jax
from repmlp_jax.inference import predictor as inference
from tests import helpers


def agreement(f32: inference.Predictor, bf16: inference.Predictor,
              images: np.ndarray) -> dict[str, float]:
  """Top-1 agreement, mean top-5 overlap and relative max logit difference, bf16 vs f32."""
  l32, l16 = f32.logits(images), bf16.logits(images)
  top5_32 = np.argsort(-l32, axis=1)[:, :5]
  top5_16 = np.argsort(-l16, axis=1)[:, :5]
  overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_32, top5_16)])
  return {'images': len(images),
          'top1_agreement': float(np.mean(top5_32[:, 0] == top5_16[:, 0])),
          'top5_overlap': float(overlap),
          'max_rel_logit_diff': float(np.abs(l32 - l16).max() / np.abs(l32).max())}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('images', nargs='*', help='image files (with --checkpoint)')
  parser.add_argument('--checkpoint', default=None, help='model directory (save_model format)')
  parser.add_argument('--model', default='RepMLPNet-B224', help='variant for random weights')
  parser.add_argument('--num-images', type=int, default=16, help='random images without files')
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--randomize-bn', action='store_true',
                      help='random weights: BatchNorm statistics far from identity (a stress test)')
  args = parser.parse_args(argv)
  if args.checkpoint:
    f32 = inference.Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
    what = args.checkpoint
  else:
    model = repmlp_jax.create_model(args.model)
    size = model.image_size
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    if args.randomize_bn:
      variables = helpers.randomize_batch_norm(variables, seed=0)  # Repository root on sys.path.
    f32 = inference.Predictor(model, variables, batch_size=args.batch_size)
    what = f'{repmlp_jax.resolve_name(args.model)} with random weights' + (
        ' and random BatchNorm statistics' if args.randomize_bn else ' (initialization)')
  bf16 = inference.Predictor(f32.model, f32.variables, dtype=jnp.bfloat16,
                             batch_size=args.batch_size)
  if args.images:
    images = f32.load_files(args.images)
  else:
    size = f32.image_size
    images = np.random.default_rng(1).normal(size=(args.num_images, size, size, 3))
    images = images.astype(np.float32)
  result = agreement(f32, bf16, images)
  print(f"{what}, {result['images']} images: top-1 agreement {result['top1_agreement']:.3f}, "
        f"top-5 overlap {result['top5_overlap']:.3f}, max |logit diff| / max |logit| "
        f"{result['max_rel_logit_diff']:.4f}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
