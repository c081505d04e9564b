"""Classifies image files with a RepMLPNet: any model this package reads (see --checkpoint).

    python predict.py --checkpoint ckpt/b224 cat.jpg dog.png --top-k 5
    python predict.py --checkpoint ckpt/b224 --bf16 cat.jpg
    python predict.py --checkpoint /tmp/repmlp-digits --class-names digits.txt 3.png  # a run
    python predict.py --checkpoint ckpt/b224 --export b224.bin      # StableHLO deploy artifact

Preprocessing is the official evaluation (short side resized to size / crop_ratio, bilinear,
center crop, ImageNet mean/std); training-form checkpoints are re-parameterized first.
Errors are one line on stderr; exit statuses: README, "The commands".
"""

import argparse
import sys
import warnings

import jax.numpy as jnp

from repmlp_jax.commands import cli
from repmlp_jax.commands import compilation_cache
from repmlp_jax import outputs
from repmlp_jax.data import imagenet
from repmlp_jax.inference import export
from repmlp_jax.inference import predictor as inference

PROG = 'predict.py'


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  parser.add_argument('images', nargs='*', help='image files (any format PIL reads)')
  parser.add_argument('--checkpoint', required=True,
                      help='a model directory (orbax or hub layout), a PyTorch .pth / '
                      '.safetensors file, or a train.py workdir or its checkpoints/<step>; '
                      'local or gs://')
  parser.add_argument('--model', help='variant of a PyTorch file (default: detected)')
  parser.add_argument('--ema', action='store_true',
                      help='the EMA weights of a PyTorch training checkpoint or a train.py run')
  parser.add_argument('--step', type=int,
                      help='which checkpoint of a train.py workdir (default: the latest)')
  parser.add_argument('--class-names', metavar='FILE',
                      help='a text file with one class name a line, in class order')
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


def read_class_names(path: str) -> list[str]:
  """One name a line (surrounding spaces and trailing empty lines dropped)."""
  with open(path, encoding='utf-8') as f:
    names = [line.strip() for line in f.read().splitlines()]
  while names and not names[-1]:
    names.pop()
  if not names:
    raise ValueError(f'{path} holds no class names; give one name a line (--class-names).')
  return names


def _names_note(predictor: inference.Predictor) -> str | None:
  """The one line that says why classes are shown as indices, or None when they have names."""
  n = predictor.model.num_classes
  if predictor.class_names != [str(i) for i in range(n)]:
    return None
  why = (f'the model has {n} classes, not ImageNet\'s {imagenet.NUM_IMAGENET_CLASSES}'
         if n != imagenet.NUM_IMAGENET_CLASSES else
         'ImageNet\'s names need tensorflow-datasets (the data extra)')
  return (f'{PROG}: classes shown as indices: {why}; --class-names FILE (one name a line) '
          'names them.')


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.hide_orbax_logs()  # A failed write is said in one line, without orbax's tracebacks.
  try:
    if args.export:  # Refused before the model loads (seconds) if the file exists.
      outputs.check_new_output(args.export)
    class_names = read_class_names(args.class_names) if args.class_names else None
    with warnings.catch_warnings():
      # The library's warning about class indices speaks to Python callers; _names_note says it.
      warnings.simplefilter('ignore', UserWarning)
      predictor = inference.Predictor.from_checkpoint(
          args.checkpoint, name=args.model, use_ema=args.ema, step=args.step,
          reparameterize_model=not args.no_reparam,
          dtype=jnp.bfloat16 if args.bf16 else jnp.float32, precision=args.precision,
          batch_size=args.batch_size, image_size=args.image_size, crop_ratio=args.crop_ratio,
          class_names=class_names)
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
  except (OSError, ValueError, ImportError) as e:  # Bad input or a failed write: one line.
    cli.error(PROG, e)
    return cli.exit_status(e)
  note = _names_note(predictor) if args.images else None
  if note:  # After the results, so that an error stays the only line.
    print(note, file=sys.stderr)
  return cli.EXIT_OK


if __name__ == '__main__':
  compilation_cache.enable()  # $REPMLP_JAX_COMPILATION_CACHE; '' turns it off.
  sys.exit(main())
