"""Classifies image files with a RepMLPNet checkpoint (a directory from save_model / convert.py).

    python predict.py --checkpoint ckpt/b224 cat.jpg dog.png --top-k 5
    python predict.py --checkpoint ckpt/b224 --bf16 cat.jpg
    python predict.py --checkpoint ckpt/b224 --export b224.bin      # StableHLO deploy artifact

Preprocessing is the official evaluation (short side resized to size / crop_ratio, bilinear,
center crop, ImageNet mean/std); training-form checkpoints are re-parameterized first.
"""

import argparse
import sys

import jax.numpy as jnp

from repmlp_jax.commands import compilation_cache
from repmlp_jax import outputs
from repmlp_jax.inference import export
from repmlp_jax.inference import predictor as inference


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('images', nargs='*', help='image files (any format PIL reads)')
  parser.add_argument('--checkpoint', required=True,
                      help='model directory (save_model format), local or gs://')
  parser.add_argument('--top-k', type=int, default=5, help='classes shown per image')
  parser.add_argument('--bf16', action='store_true', help='bfloat16 parameters and compute')
  parser.add_argument('--precision', choices=('default', 'high', 'highest'), default=None,
                      help="of every dot and convolution (default: the checkpoint's setting)")
  parser.add_argument('--batch-size', type=int, default=8, help='images per compiled batch')
  parser.add_argument('--image-size', type=int, default=None,
                      help='input side (default: the model\'s training resolution)')
  parser.add_argument('--crop-ratio', type=float, default=1.0,
                      help='1.0: official RepMLPNet eval; 0.875: Resize(256)+CenterCrop(224)')
  parser.add_argument('--no-reparam', action='store_true',
                      help='run a training-form checkpoint as is, without re-parameterizing')
  parser.add_argument('--export', metavar='OUT.bin', default=None,
                      help='also write a serialized deploy artifact (jax.export, any batch size; '
                      'local or gs://)')
  args = parser.parse_args(argv)
  if not args.images and not args.export:
    parser.error('give image files to classify and/or --export OUT.bin')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.export:  # Refused before the model loads (seconds) if the file exists.
      outputs.check_new_output(args.export)
    predictor = inference.Predictor.from_checkpoint(
        args.checkpoint, reparameterize_model=not args.no_reparam,
        dtype=jnp.bfloat16 if args.bf16 else jnp.float32, precision=args.precision,
        batch_size=args.batch_size,
        image_size=args.image_size, crop_ratio=args.crop_ratio)
    if args.images:
      classes, scores = predictor.predict_files(args.images, top_k=args.top_k)
      for path, ranked in zip(args.images, predictor.describe(classes, scores)):
        print(path)
        for rank, (index, name, score) in enumerate(ranked, 1):
          print(f'  {rank}. {score:7.4f}  {name} ({index})')
    if args.export:
      path = export.save_exported(args.export, export.export_predictor(predictor))
      print(f'Wrote {path} (input: (N, {predictor.image_size}, {predictor.image_size}, 3) '
            'normalized float32 images; output: logits).')
  except (OSError, ValueError, ImportError) as e:  # Bad input, a failed write, a missing extra.
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  compilation_cache.enable()  # $REPMLP_JAX_COMPILATION_CACHE; '' turns it off.
  sys.exit(main())
