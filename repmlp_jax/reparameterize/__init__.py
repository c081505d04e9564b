"""Structural re-parameterization: pure functions from training-form to deploy-form variables,
the shared fusion maths and one rule per model family.
"""
