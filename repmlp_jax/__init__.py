"""repmlp-jax: RepMLP and RepMLPNet in JAX/Flax, with exact structural re-parameterization."""

from repmlp_jax.models.factory import available_models, create_model, resolve_name
from repmlp_jax.reparameterize.deploy import reparam, reparam_variables
from repmlp_jax.models.features import extract_features
# PyTorch checkpoints; these modules import torch only when called (an optional dependency).
from repmlp_jax.pytorch.exporter import save_torch, to_torch_state_dict
from repmlp_jax.pytorch.importer import load_torch
# The hub layout (safetensors + config.json) and ONNX; their libraries are imported when called.
from repmlp_jax.hub import from_pretrained, save_pretrained
from repmlp_jax.inference.onnx_export import export_onnx

__all__ = [
    'available_models', 'create_model', 'extract_features', 'reparam', 'reparam_variables',
    'resolve_name',
    'load_torch', 'save_torch', 'to_torch_state_dict',
    'from_pretrained', 'save_pretrained', 'export_onnx',
]
