"""Every format the commands write, read back by every reader; a train.py run exported to PyTorch.

The formats are written by convert.py from one short digits run (tests/digits_run.py): the run's
workdir and one of its checkpoints, its deploy/ folder, an orbax directory, a hub directory, and
.pth / .safetensors state_dicts in the authors' and mmpretrain's layouts. Each reader must take
each of them: model_io.load_model, Predictor.from_checkpoint, predict.py, convert.py reparam /
export / onnx, and train.py's init_from.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from repmlp_jax import model_io
from repmlp_jax.inference import predictor as inference
from repmlp_jax.pytorch import importer
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.train import experiment
from repmlp_jax.train import trainer
from tests import digits_run
from tests import rounding
from tests import test_train_loop as tl

import convert  # pylint: disable=g-bad-import-order  (repository root)
import predict  # pylint: disable=g-bad-import-order

pytest.importorskip('torch', reason="needs the torch extra: pip install -e '.[torch]'")
pytest.importorskip('safetensors', reason="needs the hub extra: pip install 'repmlp-jax[hub]'")

# name -> (path inside the written folder, convert.py arguments that write it from the run;
# None: a path of the run itself). '{pth}' is the official.pth written before.
WRITTEN = {
    'workdir': ('', None),
    'checkpoint': (f'checkpoints/{digits_run.TOTAL_STEPS}', None),
    'deploy': ('deploy', None),
    'official.pth': ('official.pth', ['export', '{run}', '{out}']),
    'mmpretrain.pth': ('mmpretrain.pth', ['export', '{run}', '{out}', '--layout', 'mmpretrain']),
    'official.safetensors': ('official.safetensors', ['export', '{run}', '{out}']),
    'mmpretrain.safetensors': ('mmpretrain.safetensors',
                               ['export', '{run}', '{out}', '--layout', 'mmpretrain']),
    'hub': ('hub', ['export', '{run}', '{out}', '--format', 'safetensors']),
    'orbax': ('orbax', ['import', '{pth}', '{out}']),
}


def _assert_trees_equal(want, got):
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


class Reference:
  """The run's model and variables, read without the readers under test."""

  def __init__(self):
    self.config = digits_run.config()
    state = tl.restore_final_state(digits_run.experiment(), digits_run.path(),
                                   digits_run.TOTAL_STEPS)
    self.variables = {c: state[c] for c in ('params', 'batch_stats')}
    self.model = experiment.build_model(self.config, 10)
    self.deploy_model, self.deploy_variables = reparameterize.reparam(self.model, self.variables)
    self.image = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)

  def expected(self, name):
    """(model, variables) a format must give back: the run's training form, or its deploy/."""
    if name == 'deploy':
      return model_io.load_model(digits_run.path('deploy'))
    return self.model, self.variables


@pytest.fixture(scope='module', name='ref')
def _ref():
  return Reference()


@pytest.fixture(scope='module', name='written')
def _written(tmp_path_factory):
  """Every format, written by convert.py (in WRITTEN's order)."""
  folder = tmp_path_factory.mktemp('formats')
  paths = {}
  for name, (relative, args) in WRITTEN.items():
    if args is None:
      paths[name] = digits_run.path(relative)
      continue
    paths[name] = str(folder / relative)
    argv = [a.format(run=digits_run.path(), out=paths[name], pth=paths.get('official.pth'))
            for a in args]
    assert convert.main(argv) == 0, argv
  return paths


@pytest.fixture(scope='module', name='fine_tuning')
def _fine_tuning(ref):
  """An Experiment and fresh state of the run's config: what init_from loads into."""
  del ref  # The run's config: digits_run.config().
  exp = digits_run.experiment()
  return exp, exp.init_state()


@pytest.mark.parametrize('name', sorted(WRITTEN))
def test_every_written_format_is_read_by_every_reader(name, ref, written, fine_tuning, tmp_path,
                                                      capsys):
  path = written[name]
  model, variables = ref.expected(name)

  # PyTorch files (and the orbax directory imported from one) do not record the training
  # resolution: the model is the same with any input size its windows divide.
  same = ((lambda got, want: got.clone(image_size=want.image_size) == want)
          if name.endswith(('.pth', '.safetensors')) or name == 'orbax' else
          (lambda got, want: got == want))

  # model_io.load_model: the model and its variables, bit for bit.
  got_model, got_variables = model_io.load_model(path)
  assert same(got_model, model)
  _assert_trees_equal(variables, got_variables)

  # Predictor.from_checkpoint: the deploy form of the same weights.
  deploy_model, deploy_variables = ((model, variables) if model.deploy else
                                    (ref.deploy_model, ref.deploy_variables))
  predictor = inference.Predictor.from_checkpoint(path, class_names=[str(i) for i in range(10)])
  assert same(predictor.model, deploy_model)
  _assert_trees_equal(deploy_variables, predictor.variables)

  # predict.py: the top class of an image, as the deploy form ranks it.
  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
  assert predict.main(['--checkpoint', path, str(image), '--top-k', '1']) == 0
  top = int(np.argmax(predictor.logits(predictor.load_files([image]))[0]))
  assert capsys.readouterr().out.splitlines()[1].endswith(f'({top})')

  # convert.py reparam (training forms only), export, onnx.
  code = convert.main(['reparam', path, str(tmp_path / 'reparam')])
  if model.deploy:
    assert code == 2 and 'already holds the deploy form' in capsys.readouterr().err
  else:
    assert code == 0
    _assert_trees_equal(deploy_variables, model_io.load_model(tmp_path / 'reparam')[1])
    printed = capsys.readouterr().out.splitlines()  # What was read, each setting once.
    assert printed and all(line.count('num_classes=') <= 1 for line in printed), printed
  assert convert.main(['export', path, str(tmp_path / 'out.pth')]) == 0
  if not model.deploy:
    _assert_trees_equal(variables, importer.load_torch(tmp_path / 'out.pth')[1])
  if _has_onnx():
    assert convert.main(['onnx', path, str(tmp_path / 'out.onnx')]) == 0
    assert (tmp_path / 'out.onnx').is_file()

  # train.py's init_from: a training form loads into a fresh state; a deploy form is refused.
  exp, state = fine_tuning
  if model.deploy:
    with pytest.raises(ValueError, match='deploy-form model, which cannot be trained'):
      trainer.load_pretrained(exp, state, path)
  else:
    loaded = trainer.load_pretrained(exp, state, path)
    _assert_trees_equal(variables, {c: loaded[c] for c in ('params', 'batch_stats')})


def _has_onnx() -> bool:
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top,unused-import
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def test_a_run_exports_to_pytorch_exactly_and_as_its_deploy_model(ref, tmp_path, capsys):
  """A train.py checkpoint -> .pth (both layouts) -> re-imported: the same arrays, bit for bit;
  re-parameterized, the logits of the run's own deploy model (to float32 rounding)."""
  run_model, run_variables = ref.expected('deploy')
  run_logits = np.asarray(jax.jit(run_model.apply)(run_variables, ref.image))
  tolerance = rounding.flax_tolerance(ref.model, ref.variables, ref.image)
  for layout in ('official', 'mmpretrain'):
    out = tmp_path / f'{layout}.pth'
    assert convert.main(['export', digits_run.path(), str(out), '--layout', layout]) == 0
    assert f'checkpoint {digits_run.TOTAL_STEPS} of' in capsys.readouterr().out
    model, variables = importer.load_torch(out)
    assert model.clone(image_size=ref.model.image_size) == ref.model  # .pth has no image size.
    _assert_trees_equal(ref.variables, variables)
    deploy_model, deploy_variables = reparameterize.reparam(model, variables)
    logits = np.asarray(jax.jit(deploy_model.apply)(deploy_variables, ref.image))
    error = float(np.abs(logits - run_logits).max() / np.abs(run_logits).max())
    assert error <= tolerance, (layout, error, tolerance)


def test_steps_and_ema_of_a_run(ref, tmp_path, capsys):
  step = digits_run.TOTAL_STEPS
  # --step picks a checkpoint (the latest by default); one that is not there is refused.
  assert convert.main(['export', digits_run.path(), str(tmp_path / 'a.pth'), '--step',
                       str(step)]) == 0
  assert convert.main(['export', digits_run.path(), str(tmp_path / 'b.pth'), '--step', '3']) == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(f'has no checkpoint 3; it has step '
                                                           f'{step}.')
  # --ema on a run without EMA weights: one line, nothing written.
  assert convert.main(['export', digits_run.path(), str(tmp_path / 'c.pth'), '--ema']) == 2
  assert 'holds no EMA weights' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['a.pth']
