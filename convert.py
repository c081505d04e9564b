"""Converts RepMLPNet checkpoints between PyTorch and this package (a thin CLI over repmlp_jax).

Examples:
  # The authors' released weights (or mmpretrain's file) -> orbax checkpoint, training form:
  python convert.py import RepMLPNet-B224-train-acc80.32.pth ckpt/b224
  python convert.py import repmlp-base_3rdparty_8xb64_in1k_20220330-1cb1f11b.pth ckpt/b224_mm
  # ... and the deploy form next to it, or only the deploy form:
  python convert.py import RepMLPNet-B224-train-acc80.32.pth ckpt/b224 --reparam ckpt/b224_deploy
  python convert.py import RepMLPNet-B224-train-acc80.32.pth ckpt/b224_deploy --deploy
  # The reparameterize tool: training form (ours or a .pth) -> deploy form:
  python convert.py reparam ckpt/b224 ckpt/b224_deploy
  python convert.py reparam RepMLPNet-B224-train-acc80.32.pth ckpt/b224_deploy
  # Back to PyTorch (training form: the authors' layout; deploy form: their deploy model's):
  python convert.py export ckpt/b224 b224_from_jax.pth
  python convert.py export ckpt/b224 b224_mm.safetensors --layout mmpretrain
  # A train.py run (its latest checkpoint; --step N, --ema for its EMA weights):
  python convert.py export /tmp/repmlp-digits digits.pth
  python convert.py reparam /tmp/repmlp-digits digits_deploy --step 600
  # Weights in the Hugging Face hub layout (model.safetensors + config.json), from_pretrained's:
  python convert.py import RepMLPNet-B224-train-acc80.32.pth hub/b224 --format safetensors
  python convert.py export ckpt/b224 hub/b224 --format safetensors
  # ONNX of the deploy form (dynamic batch), checked against JAX with onnxruntime:
  python convert.py onnx ckpt/b224 b224.onnx --check

Every command but import reads any of: a model directory (import, reparam, train.py's deploy/),
a hub directory, a PyTorch .pth / .safetensors file, a train.py workdir or checkpoints/<step>.
Errors are one line on stderr; exit statuses: README, "The commands".
"""

import argparse
import sys

from repmlp_jax.commands import cli
from repmlp_jax.commands import compilation_cache
from repmlp_jax.commands import convert as convert_lib
from repmlp_jax.pytorch import mapping


SOURCE_HELP = ('a model directory of this package (orbax or hub layout), a PyTorch .pth / '
               '.safetensors file, or a train.py workdir or its checkpoints/<step>')


def _source_options(parser: argparse.ArgumentParser) -> None:
  """The options of every command that reads a model (model_io.read_model's)."""
  parser.add_argument('--model', help='variant of a PyTorch file (default: detected)')
  parser.add_argument('--ema', action='store_true',
                      help='the EMA weights of a PyTorch training checkpoint or a train.py run')
  parser.add_argument('--step', type=int,
                      help='which checkpoint of a train.py workdir (default: the latest)')
  parser.add_argument('--verbose', action='store_true', help='on a key mismatch, list every key')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='convert.py', description=__doc__.split('\n', 1)[0],
      epilog=__doc__.split('\n', 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)

  imp = commands.add_parser('import', help='PyTorch .pth -> orbax checkpoint directory.')
  imp.add_argument('src', help='the .pth file (official or mmpretrain; training or deploy form)')
  imp.add_argument('out_dir', help='checkpoint directory to create')
  imp.add_argument('--model', help='variant, e.g. b224 (default: detected from the shapes)')
  imp.add_argument('--deploy', action='store_true',
                   help='write the deploy form (re-parameterizes a training-form file)')
  imp.add_argument('--reparam', metavar='DEPLOY_DIR',
                   help='also write the deploy form to DEPLOY_DIR')
  imp.add_argument('--ema', action='store_true', help="use the checkpoint's EMA weights")
  imp.add_argument('--overwrite', action='store_true', help='replace existing output directories')
  imp.add_argument('--format', choices=('orbax', 'safetensors'), default='orbax',
                   help='orbax checkpoint (default) or hub directory (model.safetensors + '
                   'config.json)')
  imp.add_argument('--crop-ratio', type=float, default=1.0,
                   help="evaluation crop ratio for a hub directory's config.json (default 1.0)")
  imp.add_argument('--verbose', action='store_true', help='on a key mismatch, list every key')

  rep = commands.add_parser('reparam', help='training form -> deploy-form orbax checkpoint.')
  rep.add_argument('src', help=SOURCE_HELP)
  rep.add_argument('out_dir', help='deploy-form checkpoint directory to create')
  _source_options(rep)
  rep.add_argument('--overwrite', action='store_true', help='replace an existing output directory')

  exp = commands.add_parser('export', help='any model -> PyTorch .pth / .safetensors, or hub '
                            'directory.')
  exp.add_argument('src', help=SOURCE_HELP)
  exp.add_argument('out_file', help='the .pth or .safetensors state_dict to create (never '
                   'overwritten)')
  _source_options(exp)
  exp.add_argument('--layout', choices=('official', 'mmpretrain'), default='official',
                   help="key names: the authors' (default) or mmpretrain's")
  exp.add_argument('--format', choices=('pth', 'safetensors'), default='pth',
                   help='PyTorch .pth (default) or hub directory (model.safetensors + config.json)')
  exp.add_argument('--crop-ratio', type=float, default=1.0,
                   help="evaluation crop ratio for a hub directory's config.json (default 1.0)")

  onx = commands.add_parser('onnx', help='any model -> ONNX file of the deploy form.')
  onx.add_argument('src', help=SOURCE_HELP)
  onx.add_argument('out_file', help='the .onnx file to create (never overwritten)')
  _source_options(onx)
  onx.add_argument('--nchw', action='store_true', help='take (N, 3, H, W) images, not (N, H, W, 3)')
  onx.add_argument('--image-size', type=int, help='input side (default: the training resolution)')
  onx.add_argument('--check', action='store_true',
                   help='compare onnxruntime with JAX at batch 1 and 3')
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.hide_orbax_logs()  # A failed write is said in one line, without orbax's tracebacks.
  try:
    lines = run(args)
  except (ValueError, OSError, ImportError) as e:  # Bad input: say what and why, no traceback.
    message = str(e)
    if isinstance(e, mapping.KeyMismatchError):
      message = e.describe(verbose=getattr(args, 'verbose', False))
      if e.truncated and not getattr(args, 'verbose', False):
        message += ' --verbose lists every key.'
    cli.error(f'convert.py {args.command}', message)
    return cli.exit_status(e)
  print('\n'.join(lines))
  return cli.EXIT_OK


def run(args: argparse.Namespace) -> list[str]:
  """Runs the parsed command; returns the lines to print."""
  if args.command == 'import':
    return convert_lib.import_checkpoint(
        args.src, args.out_dir, name=args.model, deploy=args.deploy, use_ema=args.ema,
        reparam_dir=args.reparam, overwrite=args.overwrite, format=args.format,
        crop_ratio=args.crop_ratio)
  source = {'name': args.model, 'use_ema': args.ema, 'step': args.step}
  if args.command == 'reparam':
    return convert_lib.reparam_checkpoint(args.src, args.out_dir, overwrite=args.overwrite,
                                          **source)
  elif args.command == 'onnx':
    return convert_lib.onnx_checkpoint(args.src, args.out_file, nchw=args.nchw,
                                       image_size=args.image_size, check=args.check, **source)
  if args.format == 'safetensors':
    return convert_lib.export_pretrained(args.src, args.out_file, crop_ratio=args.crop_ratio,
                                         **source)
  return convert_lib.export_checkpoint(args.src, args.out_file, layout=args.layout, **source)


if __name__ == '__main__':
  compilation_cache.enable()  # $REPMLP_JAX_COMPILATION_CACHE; '' turns it off.
  sys.exit(main())
