"""Paths that had no test: the NaN guard's other triggers, convert.py's --deploy / --ema /
--overwrite and the mmpretrain export of a deploy form, predict.py's options on their success
path, a Predictor at another resolution than the model's, the bf16 Predictor's BatchNorm
statistics, and the exported artifact run by a process that never imports this package.

Success paths are checked by their outcome (files written, logits equal), not by wording.
"""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import predict
import repmlp_jax
from repmlp_jax import model_io
from repmlp_jax.inference import export
from repmlp_jax.inference import predictor as inference
from repmlp_jax.pytorch import keys_repmlpnet as keys
from repmlp_jax.train import checkpointing
from repmlp_jax.train import trainer
from tests import helpers
from tests import rounding
from tests import torch_checkpoints as tc
from tests import torch_reference as tr

import convert  # pylint: disable=g-bad-import-order  (repository root, like train.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- The NaN guard ------------------------------------------------------------------------------

@pytest.mark.parametrize('measurement, bad', [({'loss': np.inf, 'grad_norm': 1.0}, 'loss'),
                                              ({'loss': -np.inf, 'grad_norm': 1.0}, 'loss'),
                                              ({'loss': 2.3, 'grad_norm': np.nan}, 'grad_norm'),
                                              ({'loss': 2.3, 'grad_norm': np.inf}, 'grad_norm')])
def test_nan_guard_stops_on_inf_loss_and_on_a_bad_gradient_norm_alone(tmp_path, measurement, bad):
  ckpts = checkpointing.Checkpoints(str(tmp_path / 'checkpoints'))
  try:
    good = {'loss': np.float32(2.3), 'grad_norm': np.float32(1.0), 'lr': np.float32(0.1)}
    pending = [good, {**good, **{k: np.float32(v) for k, v in measurement.items()}}]
    pull_and_check = trainer._pull_and_check  # pylint: disable=protected-access
    with pytest.raises(FloatingPointError, match=rf'{bad} became .*step 6'):
      pull_and_check(pending, 4, ckpts)
    assert pull_and_check([good, good], 4, ckpts)['train/loss'] == pytest.approx(2.3)
  finally:
    ckpts.close()


# --- convert.py ---------------------------------------------------------------------------------

def _flax_logits_match_torch(out_dir, torch_model, x):
  model, variables = model_io.load_model(out_dir)
  tc.assert_logits_match(tc.torch_logits(torch_model, x), tc.flax_logits(model, variables, x),
                         rounding.tolerance(torch_model, x))
  return model, variables


def test_convert_import_deploy_ema_overwrite_and_mmpretrain_export_of_a_deploy_form(tmp_path):
  torch_model, decoy = tc.tiny_torch_model(seed=31), tc.tiny_torch_model(seed=32)
  x = tc.images(seed=33)
  src = tmp_path / 'ema.pth'  # The EMA weights are the ones to use; 'model' holds others.
  torch.save({'model': decoy.state_dict(), 'model_ema': torch_model.state_dict(), 'epoch': 3}, src)

  # --ema --deploy: the EMA weights, re-parameterized during the import.
  out = tmp_path / 'deploy'
  assert convert.main(['import', str(src), str(out), '--ema', '--deploy']) == 0
  model, variables = _flax_logits_match_torch(out, torch_model, x)
  assert model.deploy

  # --overwrite replaces the output (here with the non-EMA weights); without it, refused.
  assert convert.main(['import', str(src), str(out)]) != 0
  assert model_io.load_model(out)[0].deploy  # Untouched.
  assert convert.main(['import', str(src), str(out), '--overwrite']) == 0
  overwritten, _ = _flax_logits_match_torch(out, decoy, x)
  assert not overwritten.deploy

  # export --layout mmpretrain of a deploy form: mmpretrain's names for the official deploy
  # model's state_dict (identity BatchNorms after the folded convs); it computes the same.
  deploy_dir = tmp_path / 'deploy2'
  assert convert.main(['import', str(src), str(deploy_dir), '--ema', '--deploy']) == 0
  mm = tmp_path / 'deploy_mm.pth'
  assert convert.main(['export', str(deploy_dir), str(mm), '--layout', 'mmpretrain']) == 0
  saved = torch.load(mm, weights_only=True)['state_dict']
  official = tr.create_repmlpnet_custom(**tc.TINY, num_classes=tc.TINY_CLASSES, deploy=True)
  assert list(saved) == list(tr.to_mmpretrain_state_dict(official.state_dict()))
  official.load_state_dict(tr.from_mmpretrain_state_dict(saved), strict=True)
  tc.assert_logits_match(tc.torch_logits(torch_model, x), tc.torch_logits(official.eval(), x),
                         rounding.tolerance(torch_model, x))
  # And it is exactly what the library exports for those variables.
  expected = keys.to_mmpretrain(keys.variables_to_torch(variables, model))
  for k, v in expected.items():
    np.testing.assert_array_equal(saved[k].numpy(), v, err_msg=k)


# --- predict.py and the Predictor ---------------------------------------------------------------

@pytest.fixture(scope='module', name='tiny_checkpoint')
def _tiny_checkpoint(tmp_path_factory):
  """A training-form tiny model saved with save_model, and three image files."""
  root = tmp_path_factory.mktemp('predict')
  torch_model = tc.tiny_torch_model(seed=41)
  model, variables = repmlp_jax.load_torch(torch_model.state_dict())
  model_io.save_model(root / 'ckpt', model, variables)
  rng = np.random.default_rng(0)
  files = []
  for i, (h, w) in enumerate([(40, 48), (64, 64), (50, 30)]):
    path = root / f'img{i}.png'
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    files.append(str(path))
  return str(root / 'ckpt'), files


_RANK1 = re.compile(r'^\s+1\.\s+(\S+)\s+.*\((\d+)\)\s*$')


def _printed_top1(out: str) -> list[tuple[float, int]]:
  return [(float(m.group(1)), int(m.group(2))) for m in map(_RANK1.match, out.splitlines()) if m]


def test_predict_options_on_the_success_path(tiny_checkpoint, tmp_path, capsys):
  ckpt, files = tiny_checkpoint
  options = dict(reparameterize_model=False, dtype=jnp.bfloat16, batch_size=2, image_size=64,
                 crop_ratio=0.875)
  artifact = tmp_path / 'tiny64.bin'
  argv = files + ['--checkpoint', ckpt, '--no-reparam', '--bf16', '--batch-size', '2',
                  '--image-size', '64', '--crop-ratio', '0.875', '--top-k', '3',
                  '--export', str(artifact)]
  assert predict.main(argv) == 0
  printed = _printed_top1(capsys.readouterr().out)
  # The same options through the library give the same ranking and scores.
  library = inference.Predictor.from_checkpoint(ckpt, **options)
  assert not library.model.deploy and library.image_size == 64
  classes, scores = library.predict_files(files, top_k=3)
  assert [c for _, c in printed] == [int(c) for c in classes[:, 0]]
  # Scores are printed to 4 places.
  np.testing.assert_allclose([s for s, _ in printed], scores[:, 0], atol=1e-4)
  # The artifact: 64x64 inputs, the bf16 training form's logits.
  restored = export.load_exported(artifact)
  assert restored.in_avals[0].shape[1:] == (64, 64, 3)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(restored.call(x)), library.logits(x))
  # The default options give other scores (float32 deploy form at the model's 32x32).
  assert predict.main(files + ['--checkpoint', ckpt]) == 0
  default = _printed_top1(capsys.readouterr().out)
  assert len(default) == len(files) and default != printed


def test_predictor_at_another_resolution_than_the_model(tiny_checkpoint):
  """A 32x32 model run at 64x64 (as a 224 model at 448): the model applied to 64x64 inputs."""
  ckpt, _ = tiny_checkpoint
  model, variables = model_io.load_model(ckpt)
  assert model.image_size == 32
  predictor = inference.Predictor(model, variables, image_size=64, batch_size=2,
                                  reparameterize_model=False)
  x = np.random.default_rng(2).normal(size=(3, 64, 64, 3)).astype(np.float32)
  expected = np.asarray(jax.jit(model.apply)(variables, x))
  tc.assert_logits_match(expected, predictor.logits(x), 1e-6)  # Same program up to batching.
  with pytest.raises(ValueError):  # 40 is not a multiple of the model's 16.
    inference.Predictor(model, variables, image_size=40)


def test_bf16_predictor_keeps_batch_norms_float32(tiny_checkpoint):
  ckpt, _ = tiny_checkpoint
  model, variables = model_io.load_model(ckpt)
  predictor = inference.Predictor(model, variables, dtype=jnp.bfloat16, batch_size=2,
                                  reparameterize_model=False)
  stats = jax.tree.leaves(predictor.variables['batch_stats'])
  assert stats and all(s.dtype == jnp.float32 for s in stats)
  # Not rounded through bfloat16 either.
  chex.assert_trees_all_equal(predictor.variables['batch_stats'], variables['batch_stats'])
  # The weights in bfloat16; the BatchNorms' scales and shifts float32, as they compute.
  assert helpers.float32_params(predictor.variables) == helpers.batch_norm_params(variables)
  assert {p.dtype for p in jax.tree.leaves(predictor.variables['params'])} == {
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  full = np.asarray(jax.jit(model.apply)(variables, x))
  # bfloat16 keeps 8 bits of mantissa: ~1% of the largest logit after a dozen layers.
  tc.assert_logits_match(full, predictor.logits(x), 0.05)


def test_exported_artifact_runs_in_a_process_without_the_package(tiny_checkpoint, tmp_path):
  ckpt, _ = tiny_checkpoint
  predictor = inference.Predictor.from_checkpoint(ckpt, batch_size=2)
  artifact = export.save_exported(tmp_path / 'tiny.bin', export.export_predictor(predictor))
  x = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / 'x.npy', x)
  x_file, y_file = str(tmp_path / 'x.npy'), str(tmp_path / 'y.npy')
  script = (
      'import sys, numpy as np, jax\n'
      'from jax import export\n'
      f'exported = export.deserialize(bytearray(open({artifact!r}, "rb").read()))\n'
      f'np.save({y_file!r}, np.asarray(exported.call(np.load({x_file!r}))))\n'
      'assert not [m for m in sys.modules if m.startswith(("repmlp_jax", "flax", "tests"))], '
      'sorted(sys.modules)\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  # The same artifact run here gives the same bits; the Predictor (batches of 2, padded) differs
  # from the artifact's one batch of 3 by float32 summation order only.
  np.testing.assert_array_equal(np.load(tmp_path / 'y.npy'),
                                np.asarray(export.load_exported(artifact).call(x)))
  tc.assert_logits_match(predictor.logits(x), np.load(tmp_path / 'y.npy'), 1e-5)
