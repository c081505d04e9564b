"""The gs:// side of tests/test_gcs.py's conversion test, run beside the storage emulator.

    python -m tests.gcs_convert_worker PTH_FILE IMAGE_FILE BUCKET_URL

Runs convert.py and predict.py (their `main`, as the command line does) and the library's
readers with gs:// inputs and outputs, in one process, and prints one JSON line of what it saw;
the test compares that with what it computes locally.
"""

import contextlib
import io
import json
import sys

import numpy as np

import convert  # pylint: disable=g-bad-import-order  (repository root)
import predict  # pylint: disable=g-bad-import-order
import repmlp_jax
from repmlp_jax import hub
from repmlp_jax import model_io
from repmlp_jax import outputs
from repmlp_jax import storage
from repmlp_jax.inference import export
from repmlp_jax.pytorch import files as torch_files


def _run(main, argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return {'code': code, 'out': out.getvalue().splitlines(), 'err': err.getvalue().splitlines()}


def main(pth: str, image: str, bucket: str) -> dict:
  seen = {}
  ckpt, back, hub_dir = f'{bucket}/a/b/ckpt', f'{bucket}/out/back.pth', f'{bucket}/out/hub'
  seen['import'] = _run(convert.main, ['import', pth, ckpt])
  seen['export'] = _run(convert.main, ['export', ckpt, back])
  seen['export_again'] = _run(convert.main, ['export', ckpt, back])
  seen['export_hub'] = _run(convert.main, ['export', ckpt, hub_dir, '--format', 'safetensors'])
  seen['onnx'] = _run(convert.main, ['onnx', hub_dir, f'{bucket}/out/model.onnx', '--check'])
  seen['predict'] = _run(predict.main, ['--checkpoint', ckpt, image, '--top-k', '3',
                                        '--export', f'{bucket}/out/model.bin'])

  # What came back from the bucket, for the test to compare with its local copies.
  exported = torch_files.read_torch_checkpoint(back).state_dict
  model, variables = repmlp_jax.from_pretrained(hub_dir)
  loaded = model_io.load_model(ckpt)[1]
  artifact = export.load_exported(f'{bucket}/out/model.bin')
  size = hub.preprocessing(model)['image_size']
  images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
  seen['exported_sum'] = {k: float(np.sum(v, dtype=np.float64)) for k, v in exported.items()}
  seen['hub_equals_ckpt'] = all(
      np.array_equal(a, b) for a, b in zip(_leaves(variables), _leaves(loaded)))
  seen['artifact_logits'] = np.asarray(artifact.call(images)).tolist()
  seen['model_logits'] = np.asarray(model.apply(variables, images, train=False)).tolist()

  # The writers' never-overwrite rule on a bucket, and the readers' errors.
  try:
    outputs.write_new_file(back, lambda f: f.write(b'replacement'))
    seen['overwrote'] = True
  except FileExistsError as e:
    seen['overwrote'] = str(e)
  try:
    repmlp_jax.save_pretrained(hub_dir, model, variables)
    seen['hub_overwrote'] = True
  except FileExistsError as e:
    seen['hub_overwrote'] = str(e)
  try:
    repmlp_jax.from_pretrained(f'{bucket}/nowhere')
  except FileNotFoundError as e:
    seen['missing'] = str(e)
  try:
    outputs.check_workdir('gs://no-such-bucket/run')
  except outputs.WriteError as e:
    seen['no_bucket'] = str(e)
  seen['buckets'] = sorted(storage.gcs(storage.resolve(bucket)).ls(''))
  seen['listing'] = sorted(p.name for p in storage.resolve(f'{bucket}/out').iterdir())
  return seen


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


if __name__ == '__main__':
  print(json.dumps(main(*sys.argv[1:4])))
