"""Batched, jit-compiled inference: images in, top-k classes and scores out.

A `Predictor` holds a model and its variables on one device (CPU, GPU or TPU: whichever
`jax.devices()` gives first, or the one passed). A training-form model is re-parameterized once
(jit) to the deploy form unless asked not to. Every batch is padded to a fixed batch size, so a
Predictor compiles once per input resolution, whatever the number of images (the last partial
batch does not recompile). `dtype=jnp.bfloat16` casts the parameters (BatchNorms' stay float32),
the computation (the README gives its agreement with float32) and the images, on the host: the
device receives half the bytes, rounded as the model would round them.
"""

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repmlp_jax.data import imagenet
from repmlp_jax import model_io
from repmlp_jax.models import factory
from repmlp_jax.inference import image_files
from repmlp_jax.models import features as features_lib
from repmlp_jax.reparameterize import deploy as reparameterize


class Predictor:
  """Classifies images with a RepMLPNet, compiled once per input shape."""

  def __init__(self, model: nn.Module, variables: Any, *, reparameterize_model: bool = True,
               dtype: Any = jnp.float32, precision: Any = None, batch_size: int = 8,
               image_size: int | None = None,
               crop_ratio: float = 1.0, class_names: Sequence[str] | None = None,
               device: jax.Device | None = None):
    """Places the (re-parameterized, cast) variables on `device`.

    Args:
      model: a model from `create_model` or `load_model`, training or deploy form.
      variables: its {'params', 'batch_stats'}.
      reparameterize_model: convert a training-form model to the deploy form (jit, once).
      dtype: compute and parameter dtype (jnp.float32 or jnp.bfloat16). BatchNorms' statistics
        and parameters stay float32; logits and scores are returned as float32. None: the
        model's own dtype.
      precision: of every dot and convolution, 'default', 'high' or 'highest' (see the README,
        Numerics on accelerators); None keeps the model's.
      batch_size: the fixed batch every call is padded to (one compilation per resolution).
      image_size: side of the square input for files (default: the model's training
        resolution).
      crop_ratio: evaluation crop ratio for files (1.0: the official RepMLPNet evaluation).
      class_names: display names of the classes (default: ImageNet names from tfds for 1000
        classes, indices otherwise).
      device: where to run (default: `jax.devices()[0]`).
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive; got {batch_size}.')
    self.device = device or jax.devices()[0]
    variables = jax.device_put(variables, self.device)
    if reparameterize_model and not model.deploy:
      model, variables = reparameterize.reparam(model, variables)
    self.dtype = jnp.dtype(model.dtype if dtype is None else dtype)
    model = model.clone(dtype=self.dtype, precision=model.precision if precision is None
                        else factory.parse_precision(precision))
    variables = factory.cast_params(variables, self.dtype)
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.image_size = image_size or model.image_size or model.input_multiple
    self._check_side(self.image_size, 'image_size')
    self.crop_ratio = crop_ratio
    self.class_names = (list(class_names) if class_names is not None
                        else imagenet.class_names(model.num_classes))
    if len(self.class_names) != model.num_classes:
      raise ValueError(f'{len(self.class_names)} class names for a model with '
                       f'{model.num_classes} classes.')
    self.num_traces = 0  # How many times the forward pass was traced (= compiled).
    self._logits = jax.jit(self._forward_logits)
    self._features = jax.jit(self._forward_features, static_argnums=2)  # out_indices
    self._top_k = jax.jit(_softmax_top_k, static_argnums=1)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, *, name: str | None = None,
                      use_ema: bool = False, step: int | None = None, **kwargs) -> 'Predictor':
    """A Predictor for any model `repmlp_jax.model_io.read_model` reads.

    Args:
      path: a model directory (save_model's or the hub layout), a PyTorch .pth / .safetensors
        file, or a train.py workdir or one of its checkpoints.
      name, use_ema, step: which weights (see `model_io.read_model`).
      **kwargs: the Predictor's options (dtype, batch_size, ...).
    """
    device = kwargs.get('device') or jax.devices()[0]
    model, variables = model_io.load_model(
        path, sharding=jax.sharding.SingleDeviceSharding(device), name=name, use_ema=use_ema,
        step=step)
    return cls(model, variables, **kwargs)

  def _forward_logits(self, variables, x):
    self.num_traces += 1
    logits = self.model.apply(variables, x.astype(self.dtype), train=False)
    return logits.astype(jnp.float32)

  def _forward_features(self, variables, x, out_indices):
    self.num_traces += 1
    maps = features_lib.extract_features(self.model, variables, x.astype(self.dtype),
                                         out_indices=out_indices)
    return tuple(m.astype(jnp.float32) for m in maps)

  def _check_side(self, side: int, what: str) -> None:
    m = self.model.input_multiple
    if side % m:
      raise ValueError(f'{what} {side} does not fit {type(self.model).__name__}: input height and '
                       f'width must be multiples of {m} (e.g. {m}, {2 * m}).')

  def _check_images(self, images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected NHWC images with 3 channels, (N, H, W, 3); got shape '
                       f'{images.shape}.')
    if images.shape[0] == 0:
      raise ValueError('No images given.')
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'Expected normalized float images (see repmlp_jax.inference.image_files); got '
                       f'{images.dtype}. Use predict_files for image files.')
    self._check_side(images.shape[1], 'Image height')
    self._check_side(images.shape[2], 'Image width')
    # Through float32, as the images of the float32 model (no rounding straight from float64);
    # a float32 Predictor keeps that array rather than copying it again.
    return images.astype(np.float32).astype(self.dtype, copy=False)

  def _batches(self, images: np.ndarray):
    """Yields (padded batch on device, number of real images)."""
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]),
                                                chunk.dtype)])
      yield jax.device_put(chunk, self.device), n

  def logits(self, images: Any) -> np.ndarray:
    """Logits of preprocessed images.

    Args:
      images: (N, H, W, 3) or (H, W, 3) normalized float images (`repmlp_jax.inference.image_files`),
        H and W multiples of `model.input_multiple`.
    Returns:
      (N, num_classes) float32.
    """
    images = self._check_images(images)
    out = [np.asarray(self._logits(self.variables, batch))[:n] for batch, n in
           self._batches(images)]
    return np.concatenate(out)

  def predict(self, images: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes of preprocessed images.

    Args:
      images: as for `logits`.
      top_k: how many classes per image.
    Returns:
      (classes, scores): (N, top_k) int32 class indices and (N, top_k) float32 softmax
      probabilities, best first.
    """
    if not 1 <= top_k <= self.model.num_classes:
      raise ValueError(f'top_k must be in [1, {self.model.num_classes}]; got {top_k}.')
    images = self._check_images(images)
    classes, scores = [], []
    for batch, n in self._batches(images):
      c, s = self._top_k(self._logits(self.variables, batch), top_k)
      classes.append(np.asarray(c)[:n])
      scores.append(np.asarray(s)[:n])
    return np.concatenate(classes), np.concatenate(scores)

  def load_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Reads and preprocesses image files as the official evaluation does."""
    return image_files.load_images(paths, self.image_size, self.crop_ratio)

  def predict_files(self, paths: Sequence[str | os.PathLike],
                    top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """`predict` on image files (any format PIL reads); same return values."""
    return self.predict(self.load_files(paths), top_k)

  def features(self, images: Any, out_indices: Sequence[int] = (0, 1, 2, 3)
               ) -> tuple[np.ndarray, ...]:
    """Per-stage feature maps (backbone use) of the model this Predictor runs.

    The maps of `repmlp_jax.extract_features` (same stages, same indices), batched, compiled
    once per resolution and choice of stages.

    Args:
      images: as for `logits`.
      out_indices: which stages (0: the first, at 1/4 of the input resolution; negative indices
        count from the last).
    Returns:
      One (N, H_i, W_i, C_i) float32 map per index.
    """
    out_indices = tuple(out_indices)
    features_lib.stage_keys(self.model, out_indices)  # Bad indices fail before any work.
    images = self._check_images(images)
    per_batch = []
    for batch, n in self._batches(images):
      maps = self._features(self.variables, batch, out_indices)
      per_batch.append([np.asarray(m)[:n] for m in maps])
    return tuple(np.concatenate(maps) for maps in zip(*per_batch))

  def describe(self, classes: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, str, float]]]:
    """(class index, name, score) per image and rank, for printing."""
    return [[(int(c), self.class_names[int(c)], float(s)) for c, s in zip(cs, ss)]
            for cs, ss in zip(classes, scores)]


def _softmax_top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  scores, classes = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
  return classes.astype(jnp.int32), scores
