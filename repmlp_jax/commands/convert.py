"""The conversions behind convert.py: import, reparameterize, export.

Each function checks its output path before any heavy work, writes nothing when something is
wrong, and returns the lines it has to tell the user (convert.py prints them). Every one but
import reads its source through `model_io.read_model`, so each takes every format this package
writes, train.py checkpoints included.
"""

import os
from typing import Any

import flax.linen as nn

from repmlp_jax import hub
from repmlp_jax import model_io
from repmlp_jax import outputs
from repmlp_jax.reparameterize import deploy as reparameterize
from repmlp_jax.pytorch import exporter as torch_export
from repmlp_jax.pytorch import importer as torch_import


def _form(model: nn.Module) -> str:
  return 'deploy' if model.deploy else 'training'


def import_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                      name: str | None = None, deploy: bool = False, use_ema: bool = False,
                      reparam_dir: str | os.PathLike | None = None,
                      overwrite: bool = False, format: str = 'orbax',  # pylint: disable=redefined-builtin
                      crop_ratio: float = 1.0) -> list[str]:
  """PyTorch checkpoint -> orbax checkpoint(s) or hub directories of the Flax model.

  Args:
    src: the .pth file (official or mmpretrain; training or deploy form).
    out_dir: the checkpoint directory to write: the file's form, or the deploy form with `deploy`.
    name: the variant; None detects it.
    deploy: write the deploy form to `out_dir` (re-parameterizing a training-form file).
    use_ema: take the file's EMA weights.
    reparam_dir: also write the deploy form there (training-form files).
    overwrite: replace existing output directories (orbax only).
    format: 'orbax' (a checkpoint directory) or 'safetensors' (model.safetensors + config.json).
    crop_ratio: the evaluation crop ratio recorded in a safetensors directory's config.json.
  Returns:
    Lines describing what was read and written.
  """
  _check_format(format, overwrite)
  if deploy and reparam_dir is not None:
    raise ValueError('--deploy writes the deploy form to OUT_DIR; --reparam DEPLOY_DIR writes it '
                     'next to the training form. Use one of them.')
  out_dir = outputs.check_new_output(out_dir, overwrite=overwrite)
  if reparam_dir is not None:
    reparam_dir = outputs.check_new_output(reparam_dir, overwrite=overwrite)
  result = torch_import.import_torch(src, name, deploy=True if deploy else None, use_ema=use_ema)
  if reparam_dir is not None and result.file_deploy:
    raise ValueError('The file already holds the deploy form; drop --reparam (the import '
                     'output is the deploy form).')
  lines = result.describe().splitlines()
  _save(out_dir, result.model, result.variables, format, overwrite, crop_ratio)
  lines.append(f'wrote {_form(result.model)} form: {out_dir}')
  if reparam_dir is not None:
    deploy_model, deploy_variables = reparameterize.reparam(result.model, result.variables)
    _save(reparam_dir, deploy_model, deploy_variables, format, overwrite, crop_ratio)
    lines.append(f'wrote deploy form: {reparam_dir}')
  return lines


def _read(src: str | os.PathLike, source: dict[str, Any]) -> tuple[nn.Module, Any, list[str]]:
  """Any model this package reads (`model_io.read_model`); `source`: its name, use_ema, step."""
  result = model_io.read_model(src, **source)
  return result.model, result.variables, result.lines


def reparam_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                       overwrite: bool = False, **source: Any) -> list[str]:
  """Training-form model (any format `model_io.read_model` reads) -> deploy-form orbax directory.

  Args:
    src: a model directory of this package, a hub directory, a PyTorch file, a train.py workdir
      or one of its checkpoints.
    out_dir: the deploy-form checkpoint directory to write.
    overwrite: replace an existing output directory.
    **source: name (a PyTorch file's variant), use_ema, step (see `model_io.read_model`).
  Returns:
    Lines describing what was read and written.
  """
  out_dir = outputs.check_new_output(out_dir, overwrite=overwrite)
  model, variables, lines = _read(src, source)
  if model.deploy:
    raise ValueError(f'{src} already holds the deploy form; nothing to re-parameterize.')
  deploy_model, deploy_variables = reparameterize.reparam(model, variables)
  model_io.save_model(out_dir, deploy_model, deploy_variables, overwrite=overwrite)
  return lines + [f'wrote deploy form: {out_dir}']


def export_checkpoint(src: str | os.PathLike, out_file: str | os.PathLike, *,
                      layout: str = 'official', **source: Any) -> list[str]:
  """Any model this package reads -> PyTorch state_dict file (.pth, or .safetensors).

  Args:
    src: as for `reparam_checkpoint` (training or deploy form).
    out_file: the .pth or .safetensors file to create (never overwritten).
    layout: 'official' (a raw state_dict the authors' model loads) or 'mmpretrain'.
    **source: name, use_ema, step (see `model_io.read_model`).
  Returns:
    Lines describing what was read and written.
  """
  out_file = outputs.check_new_output(out_file)
  if layout not in torch_export.LAYOUTS:
    raise ValueError(f'Unknown layout {layout!r}; choose one of {torch_export.LAYOUTS}.')
  model, variables, lines = _read(src, source)
  torch_export.save_torch(out_file, model, variables, layout=layout)
  what = {'official': 'the authors\' model', 'mmpretrain': 'mmpretrain\'s RepMLPNet'}[layout]
  if model.deploy:
    what += ' in deploy form'
  return lines + [f'wrote {layout} state_dict: {out_file} (loads into {what})']


FORMATS = ('orbax', 'safetensors')


def _check_format(fmt: str, overwrite: bool) -> None:
  if fmt not in FORMATS:
    raise ValueError(f'Unknown format {fmt!r}; choose one of {FORMATS}.')
  if fmt == 'safetensors' and overwrite:
    raise ValueError('--overwrite applies to orbax checkpoints only; safetensors directories are '
                     'never replaced: choose a new output directory.')


def _save(path: str, model: nn.Module, variables: Any, fmt: str, overwrite: bool,
          crop_ratio: float) -> None:
  if fmt == 'safetensors':
    hub.save_pretrained(path, model, variables, crop_ratio=crop_ratio)
  else:
    model_io.save_model(path, model, variables, overwrite=overwrite)


def export_pretrained(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                      crop_ratio: float = 1.0, **source: Any) -> list[str]:
  """Any model this package reads -> hub directory (model.safetensors + config.json).

  Args:
    src: as for `reparam_checkpoint`.
    out_dir: the directory to create (never replaced).
    crop_ratio: the evaluation crop ratio recorded in config.json.
    **source: name, use_ema, step (see `model_io.read_model`).
  Returns:
    Lines describing what was read and written.
  """
  out_dir = outputs.check_new_output(out_dir)
  model, variables, lines = _read(src, source)
  hub.save_pretrained(out_dir, model, variables, crop_ratio=crop_ratio)
  return lines + [f'wrote {_form(model)} form: {out_dir} ({hub.WEIGHTS_NAME}, {hub.CONFIG_NAME})']


def onnx_checkpoint(src: str | os.PathLike, out_file: str | os.PathLike, *, nchw: bool = False,
                    image_size: int | None = None, check: bool = False,
                    **source: Any) -> list[str]:
  """Any model this package reads -> ONNX file of the deploy form (dynamic batch).

  Args:
    src: as for `reparam_checkpoint`.
    out_file: the .onnx file to create (never overwritten).
    nchw: (N, 3, H, W) inputs instead of (N, H, W, 3).
    image_size: the input side (default: the model's training resolution).
    check: run the file with onnxruntime at batch 1 and 3 and report its agreement with JAX.
    **source: name, use_ema, step (see `model_io.read_model`).
  Returns:
    Lines describing what was read and written.
  """
  from repmlp_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  out_file = outputs.check_new_output(out_file)
  model, variables, lines = _read(src, source)
  if not model.deploy:
    model, variables = reparameterize.reparam(model, variables)
    lines.append('converted to the deploy form (reparam)')
  onnx_export.export_onnx(model, variables, out_file, image_size=image_size, nchw=nchw)
  lines.append(f'wrote ONNX ({"NCHW" if nchw else "NHWC"} float32 images -> logits, dynamic '
               f'batch): {out_file}')
  if check:
    error = onnx_export.check_onnx(out_file, model, variables, image_size=image_size, nchw=nchw)
    lines.append(f'onnxruntime vs JAX at batch 1 and 3: max relative difference {error:.2g}')
  return lines
