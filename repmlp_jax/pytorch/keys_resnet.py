"""PyTorch state_dict <-> Flax variables for the v1 family (RepMLP-ResNet-50, ResNet-50).

Key names are the authors' v1 code's: stem `stage0.0.conv/.bn`, blocks `stage{n}.{i}.` with
`conv1/conv2/conv3/shortcut` (ResNet blocks), `light_conv1/light_repmlp/light_conv3` (Light) or
`btnk_conv1/btnk_conv2/btnk_repmlp/btnk_conv4/btnk_conv5` (Bottleneck); inside a RepMLP
`fc1_fc2.fc1/.fc2`, `avg.bn`, `fc3`, `fc3_bn` and `repconv{k}.conv/.bn`; classifier `linear`.
The official deploy form fuses every conv-BN into a biased conv and fc3_bn, the branches and
`avg.bn` into the FCs. Pure numpy: file reading lives elsewhere.

Layouts: conv OIHW <-> HWIO; Linear (out, in) <-> Dense (in, out); fc3 (O*h*w, C/g*h*w, 1, 1) <->
(g, C/g*h*w, O/g*h*w) (both flatten channel-major, so a reshape and a transpose); BatchNorm
weight/bias/running_mean/running_var <-> scale/bias/mean/var; num_batches_tracked is dropped on
import and written as 0.
"""

import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from repmlp_jax.models import factory
from repmlp_jax.models import repmlp_resnet
from repmlp_jax.pytorch import mapping

_FAMILY = 'RepMLP-ResNet / ResNet-50 (v1 keys)'
DetectionError = mapping.DetectionError  # What detect raises, as every family's.


class _Entry(NamedTuple):
  torch_key: str
  collection: str | None  # 'params' or 'batch_stats'; None: num_batches_tracked (no Flax leaf).
  path: tuple[str, ...]
  layout: str             # 'conv', 'dense', 'fc3', 'same' or 'count'.


def _layout(model: repmlp_resnet.RepMLPResNet) -> list[_Entry]:
  """Every state_dict entry of `model`'s form, in the official order, with its Flax place."""
  entries, deploy = [], model.deploy

  def bn(key, path):
    entries.extend([_Entry(f'{key}.weight', 'params', path + ('scale',), 'same'),
                    _Entry(f'{key}.bias', 'params', path + ('bias',), 'same'),
                    _Entry(f'{key}.running_mean', 'batch_stats', path + ('mean',), 'same'),
                    _Entry(f'{key}.running_var', 'batch_stats', path + ('var',), 'same'),
                    _Entry(f'{key}.num_batches_tracked', None, path, 'count')])

  def conv_bn(key, path):
    entries.append(_Entry(f'{key}.conv.weight', 'params', path + ('conv', 'kernel'), 'conv'))
    if deploy:
      entries.append(_Entry(f'{key}.conv.bias', 'params', path + ('conv', 'bias'), 'same'))
    else:
      bn(f'{key}.bn', path + ('bn',))

  def repmlp(key, path, has_global_perceptron):
    if has_global_perceptron:
      for fc in ('fc1', 'fc2'):
        sub = path + ('fc1_fc2', fc)
        entries.extend([_Entry(f'{key}.fc1_fc2.{fc}.weight', 'params', sub + ('kernel',), 'dense'),
                        _Entry(f'{key}.fc1_fc2.{fc}.bias', 'params', sub + ('bias',), 'same')])
      if not deploy:
        bn(f'{key}.avg.bn', path + ('avg', 'bn'))
    entries.append(_Entry(f'{key}.fc3.weight', 'params', path + ('fc3',), 'fc3'))
    if deploy:
      entries.append(_Entry(f'{key}.fc3.bias', 'params', path + ('fc3_bias',), 'same'))
      return
    bn(f'{key}.fc3_bn', path + ('fc3_bn',))
    for k in model.reparam_conv_k:
      conv_bn(f'{key}.repconv{k}', path + (f'repconv{k}',))

  conv_bn('stage0.0', ('stage0_0',))
  for spec in repmlp_resnet.block_specs(model):
    key, path = spec.name.replace('_', '.'), (spec.name,)
    if spec.kind == 'base':
      if spec.stride != 1 or spec.in_channels != spec.out_channels:
        conv_bn(f'{key}.shortcut', path + ('shortcut',))
      for name in ('conv1', 'conv2', 'conv3'):
        conv_bn(f'{key}.{name}', path + (name,))
      continue
    if spec.in_channels != spec.out_channels:
      conv_bn(f'{key}.shortcut', path + ('shortcut',))
    has_gp = spec.size != model.h or spec.size != model.w
    prefix = 'light' if spec.kind == 'light' else 'btnk'
    names = ('conv1', 'repmlp', 'conv3') if spec.kind == 'light' else (
        'conv1', 'conv2', 'repmlp', 'conv4', 'conv5')
    for name in names:
      sub = f'{prefix}_{name}'
      if name == 'repmlp':
        repmlp(f'{key}.{sub}', path + (sub,), has_gp)
      else:
        conv_bn(f'{key}.{sub}', path + (sub,))
  entries.extend([_Entry('linear.weight', 'params', ('linear', 'kernel'), 'dense'),
                  _Entry('linear.bias', 'params', ('linear', 'bias'), 'same')])
  return entries


def _torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf of `shape`."""
  if layout == 'conv':
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if layout == 'dense':
    return shape[::-1]
  if layout == 'fc3':
    g, p, q = shape
    return (g * q, p, 1, 1)
  return () if layout == 'count' else tuple(shape)


def _to_flax(layout: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if layout == 'conv':
    return value.transpose(2, 3, 1, 0)
  if layout == 'dense':
    return value.T
  if layout == 'fc3':  # (g*O/g*h*w, C/g*h*w, 1, 1) -> (g, C/g*h*w, O/g*h*w)
    g, p, q = shape
    return value.reshape(g, q, p).transpose(0, 2, 1)
  return value


def _to_torch(layout: str, value: np.ndarray) -> np.ndarray:
  if layout == 'conv':
    return value.transpose(3, 2, 0, 1)
  if layout == 'dense':
    return value.T
  if layout == 'fc3':
    g, p, q = value.shape
    return value.transpose(0, 2, 1).reshape(g * q, p, 1, 1)
  return value


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def describe(model) -> str:
  """The model's kind and form in words, for messages."""
  return (f'{type(model).__name__}(kind={model.kind!r}) '
          f'({"deploy" if model.deploy else "training"} form)')


def variables_from_torch(state_dict: Mapping[str, np.ndarray], model) -> dict[str, Any]:
  """Flax variables of `model` from an official v1 state_dict (numpy arrays).

  Every missing, unexpected and mis-shaped key is reported at once before anything is converted.

  Args:
    state_dict: key -> array, official key names, without any `module.` prefix.
    model: the RepMLPResNet to fill; `model.deploy` selects the training or the deploy form.
  Returns:
    {'params', 'batch_stats'} (deploy form: {'params'}), numpy arrays in the model's dtypes.
  Raises:
    KeyMismatchError: the state_dict does not fit the model.
  """
  layout = _layout(model)
  abstract = factory.abstract_variables(model)
  expected = {e.torch_key: _torch_shape(e.layout, () if e.collection is None else
                                        _leaf(abstract[e.collection], e.path).shape)
              for e in layout}
  mapping.check_keys(describe(model), expected,
                                {k: np.shape(v) for k, v in state_dict.items()})
  variables: dict[str, Any] = {}
  for e in layout:
    if e.collection is None:
      continue
    target = _leaf(abstract[e.collection], e.path)
    value = _to_flax(e.layout, np.asarray(state_dict[e.torch_key]), target.shape)
    node = variables.setdefault(e.collection, {})
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    node[e.path[-1]] = np.ascontiguousarray(value, dtype=target.dtype)
  return variables


def variables_to_torch(variables: Mapping[str, Any], model) -> dict[str, np.ndarray]:
  """The official v1 state_dict (key names and order) of `model`'s Flax variables.

  Args:
    variables: {'params', 'batch_stats'} of `model` (training or deploy form).
    model: the RepMLPResNet they belong to.
  Returns:
    key -> numpy array; num_batches_tracked entries are int64 zeros.
  """
  abstract = factory.abstract_variables(model)
  out, problems = {}, []
  for e in _layout(model):
    if e.collection is None:
      out[e.torch_key] = np.array(0, np.int64)
      continue
    where = '/'.join((e.collection,) + e.path)
    try:
      value = np.asarray(_leaf(variables[e.collection], e.path))
    except KeyError:
      problems.append(f'missing {where}')
      continue
    want = _leaf(abstract[e.collection], e.path).shape
    if value.shape != want:
      problems.append(f'{where} has shape {value.shape}, expected {want}')
      continue
    out[e.torch_key] = np.ascontiguousarray(_to_torch(e.layout, value))
  if problems:
    raise ValueError(f'The variables do not belong to {describe(model)}: ' + '; '.join(problems))
  return out


def _count_blocks(keys, stage: int) -> int:
  prefix = f'stage{stage}.'
  indices = {int(k[len(prefix):].split('.', 1)[0]) for k in keys if k.startswith(prefix)}
  if indices != set(range(len(indices))) or not indices:
    raise DetectionError(f'{_FAMILY}: the blocks of stage{stage} are not numbered 0..n-1 '
                         f'({sorted(indices)}).')
  return len(indices)


def _square_side(area: int, what: str) -> int:
  side = math.isqrt(area)
  if side * side != area:
    raise DetectionError(f'{_FAMILY}: {what} ({area} values) is not square; detect() only '
                         'knows square partitions and inputs. Build the model by hand '
                         '(create_model with h, w, image_size) and call variables_from_torch.')
  return side


def _repmlp_settings(sd, stage: int, kind: str) -> dict[str, Any]:
  """h, w, groups, reduction, map size (and r, K) of the first RepMLP of `stage` (2: c3, 3: c4)."""
  prefix = f'stage{stage}.1.{"light" if kind == "light" else "btnk"}_'
  fc3 = sd[f'{prefix}repmlp.fc3.weight'].shape  # (O*h*w, C/g*h*w, 1, 1)
  after = 'light_conv3' if kind == 'light' else 'btnk_conv4'
  channels = sd[f'stage{stage}.1.{after}.conv.weight'].shape[1]  # RepMLP C = O
  hw = fc3[0] // channels
  side = _square_side(hw, f'stage{stage}.1 RepMLP partition')
  out = dict(h=side, w=side, groups=channels * hw // fc3[1], reduction=None, size=side)
  fc1 = sd.get(f'{prefix}repmlp.fc1_fc2.fc1.weight')
  if fc1 is not None:  # Global Perceptron: fc1 reads C*hp*wp values.
    hidden, n = fc1.shape
    out['size'] = side * _square_side(n // channels, f'stage{stage}.1 partition grid')
    out['reduction'] = n // hidden
  if kind == 'bottleneck':
    out['r'] = sd[f'{prefix}conv1.conv.weight'].shape[0] // channels
  kernels = [k for k in sd if k.startswith(f'{prefix}repmlp.repconv') and k.endswith('conv.weight')]
  out['reparam_conv_k'] = tuple(int(k.split('repconv')[1].split('.')[0]) for k in kernels)
  return out


def detect(state_dict: Mapping[str, np.ndarray]) -> tuple[str, dict[str, Any], bool]:
  """Which v1 model a state_dict holds, from its keys and shapes.

  Args:
    state_dict: key -> array (official v1 key names).
  Returns:
    (name, overrides, deploy): `create_model(name, deploy=deploy, **overrides)` builds the model
    the state_dict fits. `name` is the closest registered variant (e.g.
    'RepMLP-ResNet50-Bottleneck'); `overrides` holds every setting that differs from it
    (num_classes included). The Local Perceptron kernels of a deploy-form file are unknowable
    and irrelevant to it: the variant's are kept.
  Raises:
    DetectionError: not a RepMLP-ResNet / ResNet-50 state_dict, or one whose keys or shapes are
      inconsistent.
  """
  try:
    return _detect(state_dict)
  except KeyError as e:  # A key that the keys found so far imply is absent.
    raise DetectionError(f'{_FAMILY}: the state_dict has no {e.args[0]!r}, which its other keys '
                         'imply. Pass the model name to get a full report of what differs.'
                         ) from None


def is_deploy(state_dict: Mapping[str, np.ndarray]) -> bool:
  """Whether an official v1 state_dict holds the deploy form (its stem conv has no BatchNorm)."""
  return 'stage0.0.bn.weight' not in state_dict


def _detect(state_dict: Mapping[str, np.ndarray]) -> tuple[str, dict[str, Any], bool]:
  keys = list(state_dict)
  if 'stage0.0.conv.weight' not in state_dict or 'linear.weight' not in state_dict:
    raise DetectionError(f'Not a {_FAMILY} state_dict: no stage0.0.conv.weight / linear.weight '
                         f'(first keys: {keys[:4]}). Strip any "module." prefix first; '
                         'RepMLPNet checkpoints have their own key map.')
  deploy = is_deploy(state_dict)
  has_light = any('.light_repmlp.' in k for k in keys)
  has_btnk = any('.btnk_repmlp.' in k for k in keys)
  if has_light and has_btnk:
    raise DetectionError(f'{_FAMILY}: the state_dict mixes Light and Bottleneck RepMLP blocks.')
  kind = 'light' if has_light else 'bottleneck' if has_btnk else 'plain'
  depths = tuple(_count_blocks(keys, n) for n in range(1, 5))
  found: dict[str, Any] = dict(
      kind=kind, depths=depths,
      channels=tuple(int(state_dict[f'stage{n}.0.conv3.conv.weight'].shape[0])
                     for n in range(1, 5)),
      stem_channels=int(state_dict['stage0.0.conv.weight'].shape[0]),
      num_classes=int(state_dict['linear.weight'].shape[0]))
  if kind != 'plain':
    if depths[1] < 2 or depths[2] < 2:
      raise DetectionError(f'{_FAMILY}: a {kind} model needs RepMLP blocks in stage2 and stage3.')
    c3, c4 = _repmlp_settings(state_dict, 2, kind), _repmlp_settings(state_dict, 3, kind)
    if (c3['h'], c3['w']) != (c4['h'], c4['w']) or c3['size'] * 8 != c4['size'] * 16:
      raise DetectionError(f'{_FAMILY}: the RepMLPs of stage2 and stage3 disagree on the '
                           'partition '
                           f'({c3["h"]} vs {c4["h"]}) or the input size ({c3["size"] * 8} vs '
                           f'{c4["size"] * 16}).')
    found.update(h=c3['h'], w=c3['w'], c3_groups=c3['groups'], c4_groups=c4['groups'],
                 image_size=c3['size'] * 8)
    reduction = c3['reduction'] or c4['reduction']
    if reduction is not None:
      found['fc1_fc2_reduction'] = reduction
    if kind == 'bottleneck':
      found['bottleneck_r'] = (c3['r'], c4['r'])
    if not deploy:
      found['reparam_conv_k'] = c3['reparam_conv_k']
  best = None
  for name, settings in repmlp_resnet.ARCH_SETTINGS.items():
    full = {**_defaults(), **settings, 'num_classes': 1000}  # create_model's default classes
    if name.startswith('_') or full['kind'] != kind:
      continue
    diff = {k: v for k, v in found.items() if full[k] != v}
    if best is None or len(diff) < len(best[1]):
      best = (name, diff)
  name, overrides = best
  overrides.pop('kind', None)
  return name, overrides, deploy


def _defaults() -> dict[str, Any]:
  fields = repmlp_resnet.RepMLPResNet.__dataclass_fields__
  return {k: f.default for k, f in fields.items() if k not in ('parent', 'name')}
