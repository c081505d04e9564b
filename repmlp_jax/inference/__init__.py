"""Inference on trained or imported models: the jitted predictor, image files, jax.export."""
