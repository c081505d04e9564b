"""`create_model`: every model of the package by name, variants being plain settings."""

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from repmlp_jax.models import pure_mlp
from repmlp_jax.models import repmlp_resnet
from repmlp_jax.models import repmlpnet

# name -> (module class, settings). Names are matched case-insensitively, with or without the
# family prefix and separators: 'RepMLPNet-B224', 'repmlpnet_b224' and 'b224' are one model;
# 'RepMLP-ResNet50-g4/8' and 'resnet50_g4_8' are 'RepMLP-ResNet50-g4-8'.
MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{name: (repmlpnet.RepMLPNet, s) for name, s in repmlpnet.ARCH_SETTINGS.items()},
    **{name: (repmlp_resnet.RepMLPResNet, s) for name, s in repmlp_resnet.ARCH_SETTINGS.items()},
    **{name: (pure_mlp.PureMLPNet, s) for name, s in pure_mlp.ARCH_SETTINGS.items()},
}


# config.precision / create_model(precision=...) names -> what every dot and convolution gets.
# 'default' is the backend's fastest float32 mode (TF32 on recent NVIDIA GPUs, one bfloat16
# pass on TPU, full float32 on CPU); README "Numerics on accelerators" has the figures.
PRECISIONS: dict[str, jax.lax.Precision | None] = {
    'default': None, 'high': jax.lax.Precision.HIGH, 'highest': jax.lax.Precision.HIGHEST}
COMPUTE_DTYPES = ('float32', 'bfloat16')


def parse_precision(precision: Any) -> jax.lax.Precision | None:
  """'default' | 'high' | 'highest' (or a jax.lax.Precision, or None) -> the models' setting."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision.lower() in PRECISIONS:
    return PRECISIONS[precision.lower()]
  raise ValueError(f'Unknown precision {precision!r}; use one of {", ".join(PRECISIONS)}.')


def parse_dtype(dtype: Any) -> jnp.dtype:
  """'float32' | 'bfloat16' (or a floating dtype) -> the models' compute dtype."""
  try:
    parsed = jnp.dtype(dtype)
  except TypeError:
    parsed = None
  if parsed is None or not jnp.issubdtype(parsed, jnp.floating):
    raise ValueError(f'Unknown compute dtype {dtype!r}; use one of {", ".join(COMPUTE_DTYPES)}.')
  return parsed


def _key(name: str) -> str:
  return re.sub(r'[^a-z0-9]', '', name.lower())


def _aliases() -> dict[str, str]:
  aliases = {}
  for name in MODELS:
    aliases[_key(name)] = name
    family, _, short = name.lstrip('_').partition('-')
    if short:
      aliases.setdefault(_key(short), name)
  return aliases


def available_models(include_private: bool = False) -> list[str]:
  """The official names create_model knows."""
  return [n for n in MODELS if include_private or not n.startswith('_')]


def resolve_name(name: str) -> str:
  """Maps any accepted spelling ('b224', 'RepMLPNet_B224') to the official name."""
  official = _aliases().get(_key(name))
  if official is None:
    raise ValueError(f'Unknown model {name!r}. Available: {", ".join(available_models())} '
                     '(case-insensitive; short forms such as "b224" work too).')
  return official


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False,
                 **overrides: Any) -> nn.Module:
  """Builds a model by its official name.

  Args:
    name: e.g. 'RepMLPNet-B224' or 'b224'.
    num_classes: size of the classifier.
    deploy: the inference form produced by `repmlp_jax.reparam` instead of the training form.
    **overrides: any field of the model class (channels, depths, partitions, sharesets,
      reparam_conv_k, dtype, precision, ...), for custom settings. `dtype` ('float32',
      'bfloat16') is the compute dtype (parameters and BatchNorm statistics stay float32);
      `precision` ('default', 'high', 'highest') goes to every dot and convolution.
  Returns:
    An unbound flax Module: `model.init(rng, x)`, `model.apply(variables, x, train=False)`.
  """
  cls, settings = MODELS[resolve_name(name)]
  fields = set(cls.__dataclass_fields__)
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f'{cls.__name__} has no setting(s) {unknown}; known: {sorted(fields - {"parent", "name"})}.')
  if 'dtype' in overrides:
    overrides['dtype'] = parse_dtype(overrides['dtype'])
  if 'precision' in overrides:
    overrides['precision'] = parse_precision(overrides['precision'])
  return cls(**{**settings, 'num_classes': num_classes, 'deploy': deploy, **overrides})


def model_spec(model: nn.Module) -> dict[str, Any]:
  """A JSON-able description of `model` (class and every setting) that `model_from_spec` rebuilds."""
  fields = {k: getattr(model, k) for k in type(model).__dataclass_fields__
            if k not in ('parent', 'name')}
  fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
  fields['dtype'] = jnp.dtype(fields['dtype']).name
  if fields.get('precision') is not None:
    fields['precision'] = str(fields['precision'])
  return {'class': type(model).__name__, 'settings': fields}


# Settings that older checkpoints' specs may hold and that no longer exist; none changed results.
_RETIRED_SETTINGS = ('jit_units',)


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
  """Inverse of `model_spec`."""
  classes = {cls.__name__: cls for cls, _ in MODELS.values()}
  cls = classes.get(spec.get('class'))
  if cls is None:
    raise ValueError(f'Unknown model class {spec.get("class")!r} in the checkpoint; this version '
                     f'of repmlp_jax knows {sorted(classes)}.')
  settings = {k: v for k, v in spec['settings'].items() if k not in _RETIRED_SETTINGS}
  settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()}
  settings['dtype'] = jnp.dtype(settings['dtype'])
  if settings.get('precision') is not None:
    settings['precision'] = jax.lax.Precision[settings['precision'].split('.')[-1]]
  return cls(**settings)


def example_input_size(model: nn.Module) -> int:
  """The smallest square input side the model accepts (for shape inference)."""
  return model.input_multiple


def abstract_variables(model: nn.Module) -> Any:
  """Shapes and dtypes of `model`'s variables, without computing anything."""
  size = example_input_size(model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def cast_params(variables: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """`variables` with the parameters that the model casts to its compute `dtype` cast once:
  the deploy form as the Predictor serves it and train.py evaluates it, rather than cast in
  every batch's program. BatchNorms (the modules holding 'batch_stats') compute in float32 and
  keep their float32 parameters and statistics, so the model's outputs do not change. A
  float32 or wider `dtype` leaves the variables as they are."""
  if jnp.finfo(dtype).bits >= 32:
    return dict(variables)
  batch_norms = {path[:-1] for path in traverse_util.flatten_dict(variables.get('batch_stats', {}))}
  params = {path: a if path[:-1] in batch_norms or not jnp.issubdtype(a.dtype, jnp.floating)
            else a.astype(dtype)
            for path, a in traverse_util.flatten_dict(variables['params']).items()}
  return {**variables, 'params': traverse_util.unflatten_dict(params)}
