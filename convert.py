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
"""

import argparse
import sys

from repmlp_jax import convert as convert_lib
from repmlp_jax.pytorch import mapping


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
  imp.add_argument('--verbose', action='store_true', help='on a key mismatch, list every key')

  rep = commands.add_parser('reparam', help='training form -> deploy-form orbax checkpoint.')
  rep.add_argument('src', help='an orbax checkpoint directory of this package, or a .pth file')
  rep.add_argument('out_dir', help='deploy-form checkpoint directory to create')
  rep.add_argument('--model', help='variant of a .pth file (default: detected)')
  rep.add_argument('--ema', action='store_true', help="use a .pth file's EMA weights")
  rep.add_argument('--overwrite', action='store_true', help='replace an existing output directory')
  rep.add_argument('--verbose', action='store_true', help='on a key mismatch, list every key')

  exp = commands.add_parser('export', help='orbax checkpoint directory -> PyTorch .pth.')
  exp.add_argument('src_dir', help='a checkpoint directory of this package (either form)')
  exp.add_argument('out_file', help='the .pth file to create (never overwritten)')
  exp.add_argument('--layout', choices=('official', 'mmpretrain'), default='official',
                   help="key names: the authors' (default) or mmpretrain's")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    lines = run(args)
  except (ValueError, OSError, ImportError) as e:  # Bad input: say what and why, no traceback.
    message = str(e)
    if isinstance(e, mapping.KeyMismatchError):
      message = e.describe(verbose=getattr(args, 'verbose', False))
      if e.truncated and not getattr(args, 'verbose', False):
        message += ' --verbose lists every key.'
    print(f'convert.py {args.command}: error: {message}', file=sys.stderr)
    return 1
  print('\n'.join(lines))
  return 0


def run(args: argparse.Namespace) -> list[str]:
  """Runs the parsed command; returns the lines to print."""
  if args.command == 'import':
    return convert_lib.import_checkpoint(
        args.src, args.out_dir, name=args.model, deploy=args.deploy, use_ema=args.ema,
        reparam_dir=args.reparam, overwrite=args.overwrite)
  elif args.command == 'reparam':
    return convert_lib.reparam_checkpoint(args.src, args.out_dir, name=args.model,
                                          use_ema=args.ema, overwrite=args.overwrite)
  return convert_lib.export_checkpoint(args.src_dir, args.out_file, layout=args.layout)


if __name__ == '__main__':
  sys.exit(main())
