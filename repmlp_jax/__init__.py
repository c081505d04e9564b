"""repmlp-jax: RepMLP and RepMLPNet in JAX/Flax, with exact structural re-parameterization."""

from repmlp_jax.models import available_models, create_model, resolve_name
from repmlp_jax.reparameterize import reparam, reparam_variables
from repmlp_jax.features import extract_features

__all__ = [
    'available_models', 'create_model', 'extract_features', 'reparam', 'reparam_variables',
    'resolve_name',
]
