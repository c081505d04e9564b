"""RepMLPNet's mapping between the official PyTorch state_dict and this package's Flax variables.

Three pure functions over numpy arrays (no torch needed): `variables_from_torch`,
`variables_to_torch` and `detect`, plus the mmpretrain renames. The model's layers are described
once, in the official registration order, as a list of `_Group`s (a conv + BN, a BN, a Linear...);
importing and exporting walk that list.

Layouts (PyTorch -> Flax): conv OIHW -> HWIO; Linear (out, in) -> Dense (in, out); the Global
Perceptron's fc1 / fc2 are 1x1 convs (out, in, 1, 1) -> Dense (in, out); fc3 (S*h*w, h*w, 1, 1),
a grouped 1x1 conv whose output o = s*h*w + q reads input p of its group -> ours (S, p, q);
the deploy fc3 bias (S*h*w,) -> (S, h*w); repconv (S, 1, k, k) -> (k, k, 1, S); BatchNorm weight /
bias / running_mean / running_var -> params scale / bias, batch_stats mean / var;
num_batches_tracked is ignored on import and written as 0 on export.

Deploy form: the official deploy model keeps a BatchNorm after the stem, downsampling and FFN
convs, and prebn2 before the FFN; this package folds those into the convs (prebn2 into ffn_fc1).
A deploy-form file is folded during import (in float64); on export a folded conv becomes the conv
plus an identity BatchNorm carrying the bias (weight 1, bias b, mean 0, var 1 - eps: eval-mode
BN then computes exactly x + b), and prebn2 an identity BatchNorm (bias 0), which the official
deploy model loads strictly and which compute the same function.
"""

import collections
import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

from repmlp_jax.models import layers
from repmlp_jax.models import factory
from repmlp_jax.models import repmlpnet
from repmlp_jax.pytorch import mapping

BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var')
OFFICIAL_KERNELS = (1, 3)

# mmpretrain's names for the official ones (REFERENCE.md section 2): whole-key prefixes, then
# names inside the stage keys.
MMPRETRAIN_PREFIXES = (
    ('conv_embedding.conv.', 'backbone.patch_embed.projection.'),
    ('conv_embedding.bn.', 'backbone.patch_embed.norm.'),
    ('stages.', 'backbone.stages.'),
    ('embeds.', 'backbone.downsample_layers.'),
    ('head_norm.', 'backbone.final_norm.'),
    ('head.', 'head.fc.'),
)
MMPRETRAIN_INFIXES = (
    ('.prebn1.', '.norm1.'), ('.prebn2.', '.norm2.'),
    ('.gp.fc1.', '.gp.conv1.conv.'), ('.gp.fc2.', '.gp.conv2.conv.'),
)


def is_mmpretrain(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are mmpretrain's (an ImageClassifier with `backbone.` / `head.fc.`)."""
  return any(k.startswith('backbone.') for k in state_dict)


def _rename(key: str, prefixes, infixes) -> str:
  for old, new in prefixes:
    if key.startswith(old):
      key = new + key[len(old):]
      break
  else:
    return key  # Unknown keys keep their name; check_keys reports them.
  for old, new in infixes:
    key = key.replace(old, new)
  return key


def _swapped(pairs) -> tuple[tuple[str, str], ...]:
  return tuple((new, old) for old, new in pairs)


def from_mmpretrain(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """mmpretrain key names -> the official ones (same arrays, same order)."""
  return {_rename(k, _swapped(MMPRETRAIN_PREFIXES), _swapped(MMPRETRAIN_INFIXES)): v
          for k, v in state_dict.items()}


def to_mmpretrain(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Official key names -> mmpretrain's (same arrays, same order)."""
  return {_rename(k, MMPRETRAIN_PREFIXES, MMPRETRAIN_INFIXES): v for k, v in state_dict.items()}


@dataclasses.dataclass(frozen=True)
class _Group:
  """One layer of the official model and where its variables live in ours."""
  kind: str  # 'conv_bn', 'bn', 'gp_fc' (1x1 conv with bias), 'linear' or 'fc3'.
  torch: str  # Official key prefix, e.g. 'stages.0.1.ffn_block.ffn_fc1'.
  flax: tuple[str, ...]  # Path of the Flax module, e.g. ('stages_0_1', 'ffn_block', 'ffn_fc1').
  shape: tuple[int, ...]  # PyTorch weight shape; (C,) for a BatchNorm.
  deploy: bool = False  # A 'bn' with deploy=True is folded into the next op (prebn2).
  input_bn: str | None = None  # Deploy 'conv_bn': the official prefix of a BN folded into it.


def _groups(model: repmlpnet.RepMLPNet) -> list[_Group]:
  """Every layer of `model`, in the official state_dict order."""
  deploy, channels = model.deploy, tuple(model.channels)
  stem = (channels[0], 3, 4, 4)
  groups = [_Group('conv_bn', 'conv_embedding', ('conv_embedding',), stem, deploy)]
  for s, (c, depth, p, shareset) in enumerate(
      zip(channels, model.depths, model.partitions, model.sharesets)):
    hidden, hw = layers.make_divisible(c // 4, model.gp_hidden_divisor), p * p
    for b in range(depth):
      t, f = f'stages.{s}.{b}', (f'stages_{s}_{b}',)
      tb, fb = f'{t}.repmlp_block', f + ('repmlp_block',)
      groups += [_Group('gp_fc', f'{tb}.gp.fc1', fb + ('gp', 'fc1'), (hidden, c, 1, 1)),
                 _Group('gp_fc', f'{tb}.gp.fc2', fb + ('gp', 'fc2'), (c, hidden, 1, 1)),
                 _Group('fc3', f'{tb}.fc3', fb, (shareset * hw, hw, 1, 1), deploy)]
      if not deploy:
        groups.append(_Group('bn', f'{tb}.fc3_bn', fb + ('fc3_bn',), (shareset,)))
        groups += [_Group('conv_bn', f'{tb}.repconv{k}', fb + (f'repconv{k}',),
                          (shareset, 1, k, k)) for k in model.reparam_conv_k]
      e = c * model.ffn_expand
      groups += [
          _Group('conv_bn', f'{t}.ffn_block.ffn_fc1', f + ('ffn_block', 'ffn_fc1'), (e, c, 1, 1),
                 deploy, f'{t}.prebn2' if deploy else None),
          _Group('conv_bn', f'{t}.ffn_block.ffn_fc2', f + ('ffn_block', 'ffn_fc2'), (c, e, 1, 1),
                 deploy),
          _Group('bn', f'{t}.prebn1', f + ('prebn1',), (c,)),
          _Group('bn', f'{t}.prebn2', f + ('prebn2',), (c,), deploy)]
  for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
    groups.append(_Group('conv_bn', f'embeds.{i}', (f'embeds_{i}',), (b, a, 2, 2), deploy))
  groups += [_Group('bn', 'head_norm', ('head_norm',), (channels[-1],)),
             _Group('linear', 'head', ('head',), (model.num_classes, channels[-1]))]
  return groups


def _bn_shapes(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
  return [(f'{prefix}.{k}', (channels,)) for k in BN_KEYS]


def _torch_shapes(group: _Group) -> list[tuple[str, tuple[int, ...]]]:
  """The group's official keys and shapes, num_batches_tracked excluded."""
  t, out = group.torch, group.shape[0]
  if group.kind == 'conv_bn':
    return [(f'{t}.conv.weight', group.shape)] + _bn_shapes(f'{t}.bn', out)
  if group.kind == 'bn':
    return _bn_shapes(t, out)
  if group.kind in ('gp_fc', 'linear'):
    return [(f'{t}.weight', group.shape), (f'{t}.bias', (out,))]
  if group.kind == 'fc3':
    return [(f'{t}.weight', group.shape)] + ([(f'{t}.bias', (out,))] if group.deploy else [])
  raise AssertionError(group.kind)


def _bn_prefixes(groups: list[_Group]) -> list[str]:
  return [g.torch + ('.bn' if g.kind == 'conv_bn' else '') for g in groups
          if g.kind in ('bn', 'conv_bn')]


def torch_shapes(model: repmlpnet.RepMLPNet) -> dict[str, tuple[int, ...]]:
  """Official key -> shape for `model` (num_batches_tracked excluded), in the official order."""
  return dict(item for g in _groups(model) for item in _torch_shapes(g))


def describe(model: repmlpnet.RepMLPNet) -> str:
  """The model's settings in words, for messages."""
  form = 'deploy form' if model.deploy else 'training form'
  return (f'RepMLPNet channels={tuple(model.channels)} depths={tuple(model.depths)} '
          f'partitions={tuple(model.partitions)} sharesets={tuple(model.sharesets)} '
          f'num_classes={model.num_classes} ({form})')


def check_state_dict(state_dict: Mapping[str, np.ndarray], model: repmlpnet.RepMLPNet) -> None:
  """Raises KeyMismatchError listing every missing, unexpected and mis-shaped key."""
  groups = _groups(model)
  bn_counters = {f'{p}.num_batches_tracked' for p in _bn_prefixes(groups)}
  got = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k not in bn_counters}
  mapping.check_keys(describe(model), torch_shapes(model), got)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> np.ndarray:
  for name in path:
    tree = tree[name]
  return np.asarray(tree)


def _f32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _bn_to_flax(sd, prefix, path, params, stats) -> None:
  _set(params, path + ('scale',), _f32(sd[f'{prefix}.weight']))
  _set(params, path + ('bias',), _f32(sd[f'{prefix}.bias']))
  _set(stats, path + ('mean',), _f32(sd[f'{prefix}.running_mean']))
  _set(stats, path + ('var',), _f32(sd[f'{prefix}.running_var']))


def _bn_affine(sd, prefix) -> tuple[np.ndarray, np.ndarray]:
  """An eval-mode BatchNorm of the state_dict as float64 (scale, shift): y = x * scale + shift."""
  scale = np.asarray(sd[f'{prefix}.weight'], np.float64) / np.sqrt(
      np.asarray(sd[f'{prefix}.running_var'], np.float64) + layers.BN_EPSILON)
  return scale, sd[f'{prefix}.bias'] - np.asarray(sd[f'{prefix}.running_mean'], np.float64) * scale


def _identity_bn(prefix: str, bias: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """A BatchNorm whose eval mode computes exactly x + bias: (x - 0) / sqrt(1 - eps + eps) + bias."""
  return [(f'{prefix}.weight', np.ones_like(bias)),
          (f'{prefix}.bias', bias),
          (f'{prefix}.running_mean', np.zeros_like(bias)),
          (f'{prefix}.running_var', np.full_like(bias, 1.0 - layers.BN_EPSILON)),
          (f'{prefix}.num_batches_tracked', np.array(0, np.int64))]


def _oihw_to_hwio(w) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _group_to_flax(g: _Group, sd: Mapping[str, np.ndarray], params: dict, stats: dict) -> None:
  t, f = g.torch, g.flax
  if g.kind == 'conv_bn' and not g.deploy:
    _set(params, f + ('conv', 'kernel'), _f32(_oihw_to_hwio(sd[f'{t}.conv.weight'])))
    _bn_to_flax(sd, f'{t}.bn', f + ('bn',), params, stats)
  elif g.kind == 'conv_bn':
    # The official deploy model keeps conv -> BN; ours folds the BN into the conv (in float64),
    # and a BN before a 1x1 conv (prebn2) into its input side.
    scale, shift = _bn_affine(sd, f'{t}.bn')
    kernel = _oihw_to_hwio(np.asarray(sd[f'{t}.conv.weight'], np.float64)) * scale
    if g.input_bn:
      in_scale, in_shift = _bn_affine(sd, g.input_bn)
      shift = shift + in_shift @ kernel[0, 0]
      kernel = kernel * in_scale[:, None]
    _set(params, f + ('conv', 'kernel'), _f32(kernel))
    _set(params, f + ('conv', 'bias'), _f32(shift))
  elif g.kind == 'bn' and g.deploy:
    pass  # Folded into the next conv, which reads it (input_bn).
  elif g.kind == 'bn':
    _bn_to_flax(sd, t, f, params, stats)
  elif g.kind == 'gp_fc':
    _set(params, f + ('kernel',), _f32(sd[f'{t}.weight'][:, :, 0, 0].T))
    _set(params, f + ('bias',), _f32(sd[f'{t}.bias']))
  elif g.kind == 'linear':
    _set(params, f + ('kernel',), _f32(sd[f'{t}.weight'].T))
    _set(params, f + ('bias',), _f32(sd[f'{t}.bias']))
  elif g.kind == 'fc3':
    hw = g.shape[1]
    s = g.shape[0] // hw
    # Row o = s*hw + q of the grouped conv reads input p of group s: ours[s, p, q].
    weight = sd[f'{t}.weight'][:, :, 0, 0].reshape(s, hw, hw).transpose(0, 2, 1)
    _set(params, f + ('fc3',), _f32(weight))
    if g.deploy:
      _set(params, f + ('fc3_bias',), _f32(sd[f'{t}.bias'].reshape(s, hw)))
  else:
    raise AssertionError(g.kind)


def variables_from_torch(state_dict: Mapping[str, np.ndarray],
                         model: repmlpnet.RepMLPNet) -> dict[str, Any]:
  """Official state_dict (numpy arrays, official key names) -> `model`'s Flax variables.

  Args:
    state_dict: training-form keys for a training-form `model`, deploy-form keys for a deploy
      one (`model.deploy`); num_batches_tracked entries are ignored.
    model: the RepMLPNet the variables are for.
  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  Raises:
    KeyMismatchError: listing every missing, unexpected and mis-shaped key; nothing converted.
  """
  check_state_dict(state_dict, model)
  params, stats = {}, {}
  for g in _groups(model):
    _group_to_flax(g, state_dict, params, stats)
  return {'params': params, 'batch_stats': stats}


def _bn_to_torch(prefix, path, params, stats) -> list[tuple[str, np.ndarray]]:
  return [(f'{prefix}.weight', _get(params, path + ('scale',))),
          (f'{prefix}.bias', _get(params, path + ('bias',))),
          (f'{prefix}.running_mean', _get(stats, path + ('mean',))),
          (f'{prefix}.running_var', _get(stats, path + ('var',))),
          (f'{prefix}.num_batches_tracked', np.array(0, np.int64))]


def _group_to_torch(g: _Group, params: Mapping, stats: Mapping) -> list[tuple[str, np.ndarray]]:
  t, f = g.torch, g.flax
  if g.kind == 'conv_bn':
    kernel = _get(params, f + ('conv', 'kernel')).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if not g.deploy:
      return [(f'{t}.conv.weight', kernel)] + _bn_to_torch(f'{t}.bn', f + ('bn',), params, stats)
    # The official deploy model has conv (no bias) -> BN: an identity BN carrying our bias.
    return [(f'{t}.conv.weight', kernel)] + _identity_bn(f'{t}.bn',
                                                         _get(params, f + ('conv', 'bias')))
  if g.kind == 'bn' and g.deploy:  # Folded into the next conv: an identity BN in its place.
    like = _get(params, g.flax[:-1] + ('ffn_block', 'ffn_fc1', 'conv', 'bias'))
    return _identity_bn(t, np.zeros(g.shape, like.dtype))
  if g.kind == 'bn':
    return _bn_to_torch(t, f, params, stats)
  if g.kind == 'gp_fc':
    kernel = _get(params, f + ('kernel',))
    return [(f'{t}.weight', kernel.T[:, :, None, None]), (f'{t}.bias', _get(params, f + ('bias',)))]
  if g.kind == 'linear':
    return [(f'{t}.weight', _get(params, f + ('kernel',)).T),
            (f'{t}.bias', _get(params, f + ('bias',)))]
  if g.kind == 'fc3':
    weight = _get(params, f + ('fc3',))  # (S, p, q)
    out = [(f'{t}.weight', weight.transpose(0, 2, 1).reshape(g.shape))]
    if g.deploy:
      out.append((f'{t}.bias', _get(params, f + ('fc3_bias',)).reshape(-1)))
    return out
  raise AssertionError(g.kind)


def variables_to_torch(variables: Mapping[str, Any],
                       model: repmlpnet.RepMLPNet) -> dict[str, np.ndarray]:
  """`model`'s Flax variables -> the official state_dict (numpy arrays, official names and order).

  A training-form model gives the authors' training layout; a deploy-form one gives a state_dict
  that the official deploy model (`deploy=True`) loads with strict=True and that computes the
  same outputs.
  """
  params, stats = variables['params'], variables.get('batch_stats', {})
  out = collections.OrderedDict()
  for g in _groups(model):
    for key, value in _group_to_torch(g, params, stats):
      out[key] = np.array(value, order="C")  # A C-contiguous copy (keeps 0-d shapes).
  return out


# The error every family's detect raises (the RepMLPNet settings cannot be read: unknown,
# inconsistent or ambiguous).
DetectionError = mapping.DetectionError


def is_deploy(state_dict: Mapping[str, np.ndarray]) -> bool:
  """Whether an official-layout state_dict holds the deploy form (its fc3s have a bias)."""
  return any(k.endswith('.repmlp_block.fc3.bias') for k in state_dict)


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
  if key not in sd:
    raise DetectionError(f'Cannot detect the RepMLPNet variant: the state_dict has no {key!r}. '
                         'Pass the model name (--model) to get a full report of what differs.')
  return tuple(np.shape(sd[key]))


def detect(state_dict: Mapping[str, np.ndarray]) -> tuple[str | None, dict[str, Any], bool]:
  """Reads the RepMLPNet settings from the tensor shapes of an official-layout state_dict.

  Channels come from the stem and the prebn1s, depths from the stage keys, partitions and
  sharesets from the fc3 shapes, kernel sizes from the repconv keys (training form; a deploy
  file has none and keeps the official (1, 3)), the form from fc3.bias / fc3_bn, num_classes from
  the head, the Global Perceptron width rule (official C // 4 or mmpretrain's make_divisible) from
  gp.fc1, the FFN expansion from ffn_fc1.

  Args:
    state_dict: official key names (mmpretrain files renamed by `from_mmpretrain` first).
  Returns:
    (name, overrides, deploy): `create_model(name, deploy=deploy, **overrides)` builds the model.
    `name` is the official variant with these settings, or None when no variant has them but
    they are self-consistent; `overrides` then holds every setting (build
    `RepMLPNet(**overrides, deploy=deploy)`).
  Raises:
    DetectionError: not a RepMLPNet state_dict, inconsistent, or ambiguous (non-square windows).
  """
  if 'conv_embedding.conv.weight' not in state_dict:
    sample = ', '.join(list(state_dict)[:5])
    raise DetectionError('Not a RepMLPNet state_dict (no conv_embedding.conv.weight); its keys '
                         f'begin with: {sample}. Pass the model name to see a full key report.')
  blocks = collections.defaultdict(set)
  for key in state_dict:
    m = re.match(r'stages\.(\d+)\.(\d+)\.', key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    raise DetectionError(f'Cannot detect the RepMLPNet stages: stage indices {sorted(blocks)}.')
  depths = []
  for s in range(len(blocks)):
    if sorted(blocks[s]) != list(range(len(blocks[s]))):
      raise DetectionError(f'Stage {s} has blocks {sorted(blocks[s])}: some are missing.')
    depths.append(len(blocks[s]))
  channels, partitions, sharesets, gp_hidden, expand = [], [], [], [], set()
  forms = set()
  for s in range(len(depths)):
    t = f'stages.{s}.0'
    c = _shape(state_dict, f'{t}.prebn1.weight')[0]
    fc3 = _shape(state_dict, f'{t}.repmlp_block.fc3.weight')
    hw = fc3[1]
    h = math.isqrt(hw)
    if h * h != hw:
      raise DetectionError(
          f'Ambiguous window in stage {s}: fc3 maps h*w = {hw} values, which is not a square; '
          'the window shape (h, w) cannot be told from the weights, and this implementation '
          'supports square windows only.')
    if fc3[0] % hw:
      raise DetectionError(f'Stage {s}: fc3 weight shape {fc3} is not (S*h*w, h*w, 1, 1).')
    channels.append(c)
    partitions.append(h)
    sharesets.append(fc3[0] // hw)
    gp_hidden.append(_shape(state_dict, f'{t}.repmlp_block.gp.fc1.weight')[0])
    expand.add(_shape(state_dict, f'{t}.ffn_block.ffn_fc1.conv.weight')[0] / c)
    for b in range(depths[s]):
      prefix = f'stages.{s}.{b}.repmlp_block'
      forms.add((f'{prefix}.fc3.bias' in state_dict, f'{prefix}.fc3_bn.weight' in state_dict))
  if forms == {(True, False)}:
    deploy = True
  elif forms == {(False, True)}:
    deploy = False
  else:
    raise DetectionError('Cannot tell the training form (fc3_bn, no fc3.bias) from the deploy '
                         'form (fc3.bias, no fc3_bn): the blocks of this state_dict mix them.')
  if len(expand) != 1 or not float(next(iter(expand))).is_integer():
    raise DetectionError(f'Inconsistent FFN widths across stages (expansions {sorted(expand)}).')
  kernels = OFFICIAL_KERNELS
  if not deploy:
    branch = re.compile(r'stages\.0\.0\.repmlp_block\.repconv(\d+)\.conv\.weight')
    kernels = tuple(int(m.group(1)) for m in map(branch.fullmatch, state_dict) if m)
  divisor = _gp_divisor(channels, gp_hidden)
  settings = dict(channels=tuple(channels), depths=tuple(depths), partitions=tuple(partitions),
                  sharesets=tuple(sharesets), reparam_conv_k=kernels)
  extras = dict(num_classes=_shape(state_dict, 'head.weight')[0])
  if divisor != 1:
    extras['gp_hidden_divisor'] = divisor
  if int(next(iter(expand))) != 4:
    extras['ffn_expand'] = int(next(iter(expand)))
  for name, (cls, arch) in factory.MODELS.items():
    if cls is repmlpnet.RepMLPNet and all(
        tuple(arch.get(k, OFFICIAL_KERNELS)) == v for k, v in settings.items()):
      return name, extras, deploy
  return None, {**settings, 'image_size': None, **extras}, deploy


def _gp_divisor(channels: list[int], hidden: list[int]) -> int:
  for divisor in (1, 8):  # Official first: both rules agree for most widths.
    if all(layers.make_divisible(c // 4, divisor) == h for c, h in zip(channels, hidden)):
      return divisor
  raise DetectionError(
      f'The Global Perceptron widths {hidden} for channels {channels} follow neither the '
      'official rule (C // 4) nor mmpretrain\'s (make_divisible(C // 4, 8)).')
