"""Structural re-parameterization: pure, jit-able functions from training-form to deploy-form
variables.

Belongs here: the shared fusion maths (`fusion`: BatchNorm folding, kernel padding, conv to FC),
one rule per model family (`repmlpnet`, `resnet` for the v1 models) and the public entry point
(`deploy.reparam`, which finds a model's rule through `repmlp_jax.families`). Rules read and
return pytrees; they never touch modules in place, files or PyTorch.
"""
