"""ONNX export of the deploy form (jax2onnx), for onnxruntime, mmdeploy-style and browser runtimes.

The graph maps normalized float32 images, NHWC (N, H, W, 3) by default or NCHW (N, 3, H, W) on
request, to float32 logits (N, num_classes). The batch dimension is dynamic ('batch'); the spatial
size is fixed. The weights are embedded (one self-contained file), and the file's metadata holds
the model's config.json (settings, form, evaluation preprocessing) under `repmlp_jax.config`.

jax2onnx traces the forward pass and translates its flax layers and JAX primitives to ONNX
operators, so the exported graph is the computation JAX runs, not a re-implementation of the model.

Needs the `onnx` extra: pip install 'repmlp-jax[onnx]'.
"""

import contextlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repmlp_jax import outputs
from repmlp_jax import hub
from repmlp_jax import storage
from repmlp_jax.reparameterize import deploy as reparameterize

ONNX_EXTRA = "pip install 'repmlp-jax[onnx]'"
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
METADATA_KEY = 'repmlp_jax.config'
_PROTOBUF_LIMIT = 2**31 - 1  # A single-file ONNX model is one protobuf message.


def _missing(what: str, error: ImportError) -> ImportError:
  return ImportError(f'{what} needs {error.name or "a package"}, an optional dependency of '
                     f'repmlp-jax: {ONNX_EXTRA}.')


@contextlib.contextmanager
def _quiet(logger_name: str):
  # onnx_ir warns once per shape value whose type jax2onnx leaves unset (hundreds for B224) and
  # leaves out only that optional type annotation; runtimes infer it.
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def to_onnx(model: nn.Module, variables: Any, *, image_size: int | None = None,
            nchw: bool = False, opset: int = 23) -> Any:
  """The ONNX model (an `onnx.ModelProto`) of `model`'s deploy form.

  Args:
    model: training or deploy form; a training form is re-parameterized first.
    variables: its {'params', 'batch_stats'}.
    image_size: side of the square input (default: the model's training resolution).
    nchw: take (N, 3, H, W) inputs, as PyTorch-exported models do, instead of NHWC.
    opset: the ONNX opset to target.
  Returns:
    The ModelProto, weights embedded.
  """
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing('ONNX export', e) from e
  if not model.deploy:
    model, variables = reparameterize.reparam(model, variables)
  config = hub.pretrained_config(model, image_size=image_size)
  size = config['preprocessing']['image_size']
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)

  def logits(images):
    return model.apply(variables, images, train=False).astype(jnp.float32)

  with _quiet('onnx_ir.serde'):
    proto = jax2onnx.to_onnx(
        logits, [('batch', size, size, 3)],  # With inputs_as_nchw, the file transposes NCHW.
        model_name=config['architecture'] or type(model).__name__, opset=opset,
        inputs_as_nchw=[0] if nchw else None, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME])
  config['preprocessing']['layout'] = 'NCHW' if nchw else 'NHWC'
  entry = proto.metadata_props.add()
  entry.key, entry.value = METADATA_KEY, json.dumps(config)
  return proto


def export_onnx(model: nn.Module, variables: Any, path: str | os.PathLike, *,
                image_size: int | None = None, nchw: bool = False, opset: int = 23) -> str:
  """Writes an ONNX file of `model`'s deploy form (dynamic batch), atomically, never replacing one.

  Args:
    model: training or deploy form; a training form is re-parameterized first.
    variables: its {'params', 'batch_stats'}.
    path: the .onnx file to create (local or gs://); missing parent directories are made.
    image_size: side of the square input (default: the model's training resolution).
    nchw: take (N, 3, H, W) inputs instead of (N, H, W, 3).
    opset: the ONNX opset to target.
  Returns:
    The absolute path written.
  """
  outputs.check_new_output(path)  # Before the export, which takes a while.
  data = to_onnx(model, variables, image_size=image_size, nchw=nchw,
                 opset=opset).SerializeToString()
  if len(data) > _PROTOBUF_LIMIT:  # Not reached by the released variants (B224 is ~0.3 GB).
    raise ValueError(f'The model takes {len(data) / 2**30:.1f} GiB, over the 2 GiB a '
                     'single-file ONNX model can hold.')
  return outputs.write_new_file(path, lambda f: f.write(data))


def onnxruntime_session(path: str | os.PathLike, *, threads: int | None = None) -> Any:
  """An onnxruntime CPU session for a file written by `export_onnx`.

  Args:
    path: the .onnx file.
    threads: intra-op threads (default: onnxruntime's, one per physical core).
  Returns:
    `onnxruntime.InferenceSession`; run it with `run_onnx`.
  """
  try:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing('Running an ONNX file', e) from e
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  # onnxruntime reads a local file, or the model's bytes (from a bucket).
  model = (os.fspath(path) if not storage.is_remote(path)
           else storage.resolve(path).read_bytes())
  return ort.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def run_onnx(session: Any, images: Any) -> np.ndarray:
  """Logits of normalized float32 images (the layout the file was exported with)."""
  return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(images, np.float32)})[0]


def check_onnx(path: str | os.PathLike, model: nn.Module, variables: Any, *,
               image_size: int | None = None, nchw: bool = False,
               batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
  """How far onnxruntime's logits are from JAX's on random images, at each batch size.

  Args:
    path: a file written by `export_onnx` for `model`.
    model, variables: the model exported (either form).
    image_size, nchw: as given to `export_onnx`.
    batch_sizes: the batch sizes to run (the file's batch dimension is dynamic).
    seed: of the random normal images.
  Returns:
    The largest relative difference max|ort - jax| / max|jax| over the batch sizes.
  """
  size = hub.preprocessing(model, image_size=image_size)['image_size']
  session = onnxruntime_session(path)
  # Variables as an argument: closed over, XLA would constant-fold the big deploy kernels.
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  # JAX runs once, at the largest batch; each row does not depend on the others.
  images = np.random.default_rng(seed).standard_normal(
      (max(batch_sizes), size, size, 3), dtype=np.float32)
  expected = np.asarray(forward(variables, images), np.float64)
  worst = 0.0
  for n in batch_sizes:
    got = run_onnx(session, images[:n].transpose(0, 3, 1, 2) if nchw else images[:n])
    if got.shape != expected[:n].shape:
      raise ValueError(f'The ONNX file gives logits of shape {got.shape} for {n} images; '
                       f'JAX gives {expected[:n].shape}.')
    worst = max(worst, float(np.abs(got - expected[:n]).max() / np.abs(expected[:n]).max()))
  return worst
