"""ImageNet-1k metadata: the normalization statistics, and the class names from the files
tensorflow-datasets ships (never downloaded).

tfds's `imagenet2012` builder orders its 1000 labels by the synset ids in
`tensorflow_datasets/datasets/imagenet2012/labels.txt` (n01440764, ...), the same order as the
torchvision / official RepMLPNet class indices. The human-readable names in that order ship in
tfds as the Python list `IMAGENET_LABELS_LIST` of `datasets/siscore/labels.py`; it is read as data
(parsed, not imported), so neither TensorFlow nor tfds is imported at inference.
"""

import ast
import functools
import importlib.util
import os
import warnings

# Per-channel mean and std of ImageNet's RGB pixels on the [0, 1] scale (every pipeline uses them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NUM_IMAGENET_CLASSES = 1000
_SYNSETS_FILE = ('datasets', 'imagenet2012', 'labels.txt')
_NAMES_FILE = ('datasets', 'siscore', 'labels.py')
_NAMES_VARIABLE = 'IMAGENET_LABELS_LIST'


def _tfds_root() -> str | None:
  spec = importlib.util.find_spec('tensorflow_datasets')  # Locates the package, imports nothing.
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
  """The 1000 WordNet ids in class-index order, from tfds' imagenet2012 label file."""
  root = _tfds_root()
  if root is None:
    raise FileNotFoundError('tensorflow-datasets is not installed '
                            '(pip install tensorflow-datasets).')
  with open(os.path.join(root, *_SYNSETS_FILE)) as f:
    synsets = tuple(line.strip() for line in f if line.strip())
  if len(synsets) != NUM_IMAGENET_CLASSES:
    raise ValueError(f'{f.name} holds {len(synsets)} labels, expected {NUM_IMAGENET_CLASSES}.')
  return synsets


@functools.cache
def imagenet_names() -> tuple[str, ...]:
  """The 1000 human-readable names in class-index order ('tench, Tinca tinca', ...)."""
  root = _tfds_root()
  if root is None:
    raise FileNotFoundError('tensorflow-datasets is not installed '
                            '(pip install tensorflow-datasets).')
  path = os.path.join(root, *_NAMES_FILE)
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], 'id', None) == _NAMES_VARIABLE):
      names = tuple(ast.literal_eval(node.value))
      if len(names) != NUM_IMAGENET_CLASSES:
        break
      return names
  raise ValueError(f'{path} does not hold the {NUM_IMAGENET_CLASSES} ImageNet names in '
                   f'{_NAMES_VARIABLE}; this tensorflow-datasets version is not supported.')


def class_names(num_classes: int) -> list[str]:
  """Display names for a classifier's outputs.

  ImageNet names ('tench', with the synset id available from `imagenet_synsets`) when
  num_classes is 1000 and tensorflow-datasets is installed; otherwise the class indices as
  strings, with a warning saying why.
  """
  if num_classes == NUM_IMAGENET_CLASSES:
    try:
      return [name.split(',')[0] for name in imagenet_names()]
    except (OSError, ValueError, SyntaxError) as e:
      warnings.warn(f'ImageNet class names unavailable ({e}); showing class indices instead.',
                    stacklevel=2)
  else:
    warnings.warn(f'The model has {num_classes} classes, not ImageNet\'s {NUM_IMAGENET_CLASSES}; '
                  'showing class indices (pass class_names=... for names).', stacklevel=2)
  return [str(i) for i in range(num_classes)]
