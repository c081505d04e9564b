"""The package's shape: no import circle, key maps free of orbax and torch, models free of the rest
of the package, inference on files free of TensorFlow, every model class registered.

The import graph is read from the source (ast), so imports inside functions count too.
"""

import ast
import os

import pytest

from repmlp_jax import families
from repmlp_jax.models import factory

PACKAGE = 'repmlp_jax'
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3]
        name = rel.replace(os.sep, '.').removesuffix('.__init__')
        out[name] = os.path.join(folder, f)
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules and third-party top-level names that `path` imports (anywhere in it)."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from repmlp_jax.models import factory` imports the module repmlp_jax.models.factory;
      # `from repmlp_jax.models.factory import create_model`, the module itself.
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        names.add(sub if sub in modules else node.module)
  return names


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for imported in _imports(path, modules):
      if imported in modules:
        deps.add(imported)
      elif not imported.startswith(PACKAGE):
        deps.add(imported.split('.')[0])  # Third party: the distribution's top-level name.
    graph[name] = deps - {name}
  return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_no_import_circle():
  graph = _graph()
  # A package's __init__ importing its own submodules is how packages work, not a circle.
  internal = {m: {d for d in deps if d in graph and not m == d.rsplit('.', 1)[0]}
              for m, deps in graph.items()}
  circles = [m for m in internal if m in _closure(internal, m)]
  assert not circles, f'modules on an import circle: {sorted(circles)}'


@pytest.mark.parametrize('module', ['repmlp_jax.pytorch.keys_repmlpnet',
                                    'repmlp_jax.pytorch.keys_resnet',
                                    'repmlp_jax.families'])
def test_key_maps_need_neither_orbax_nor_torch(module):
  reached = _closure(_graph(), module)
  assert not reached & {'orbax', 'torch', 'repmlp_jax.model_io'}, sorted(reached)


def test_models_depend_on_nothing_else_in_the_package():
  graph = _graph()
  for module, deps in graph.items():
    if module.startswith('repmlp_jax.models'):
      outside = {d for d in deps if d.startswith(PACKAGE) and not d.startswith('repmlp_jax.models')}
      assert not outside, (module, outside)


@pytest.mark.parametrize('module', ['repmlp_jax.inference.image_files',
                                    'repmlp_jax.data.eval_transform'])
def test_inference_on_files_needs_no_tensorflow(module):
  assert not _closure(_graph(), module) & {'tensorflow', 'tensorflow_datasets', 'orbax'}


def test_at_most_eight_modules_at_the_top():
  top = [f for f in os.listdir(ROOT) if f.endswith('.py')]
  assert len(top) <= 8, top


def test_every_model_class_has_a_family():
  classes = {cls for cls, _ in factory.MODELS.values()}
  assert classes == set(families.FAMILIES)
  for cls in classes:
    family = families.of(cls)
    assert family.classifier in ('head', 'linear')
    if family.torch_keys is not None:
      # The markers tell the families apart: each names its own family only.
      assert families.for_state_dict({family.torch_keys.marker: None}) is cls


def test_an_unregistered_class_is_refused_clearly():
  import flax.linen as nn

  class Other(nn.Module):
    deploy: bool = False

  with pytest.raises(TypeError, match='Other is not a registered model family'):
    families.of(Other())
  from repmlp_jax.models import pure_mlp
  with pytest.raises(ValueError, match='No PyTorch key map is defined for PureMLPNet'):
    families.torch_keys_of(pure_mlp.PureMLPNet)


def test_pytorch_files_of_a_family_without_a_key_map_are_refused_clearly():
  import numpy as np
  import repmlp_jax
  sd = {'stage0.0.conv.weight': np.zeros((4, 3, 3, 3), np.float32)}
  with pytest.raises(ValueError, match='supported for RepMLPNet, RepMLPResNet'):
    repmlp_jax.load_torch(sd, 'RepMLP-CIFAR-PureMLP')
  with pytest.raises(ValueError, match='No PyTorch key map is defined for PureMLPNet'):
    repmlp_jax.to_torch_state_dict(repmlp_jax.create_model('RepMLP-CIFAR-PureMLP'), {})
  with pytest.raises(ValueError, match='Not a checkpoint of a known model'):
    repmlp_jax.load_torch({'fc.weight': np.zeros((2, 2), np.float32)})


def test_both_detect_functions_raise_detection_error():
  import numpy as np
  from repmlp_jax.pytorch import keys_repmlpnet, keys_resnet, mapping
  z = np.zeros((2, 2), np.float32)
  resnet_like = {'stage0.0.conv.weight': z, 'linear.weight': z,
                 **{f'stage{n}.0.conv1.conv.weight': z for n in range(1, 5)}}
  for detect, sd, message in [
      (keys_repmlpnet.detect, resnet_like, 'Not a RepMLPNet'),
      (keys_resnet.detect, {'conv_embedding.conv.weight': z}, 'Not a RepMLP-ResNet'),
      (keys_resnet.detect, resnet_like, "no 'stage1.0.conv3.conv.weight'")]:  # A missing key.
    with pytest.raises(mapping.DetectionError, match=message):
      detect(sd)
