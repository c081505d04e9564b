"""Inference on trained or imported models: what `predict.py` runs.

Belongs here: the batched, jitted `predictor.Predictor` (deploy form by default, compiled once
per resolution), image files to model inputs (`image_files`, over the official evaluation
preprocessing in `repmlp_jax.data.eval_transform`; no TensorFlow) and the serialized `jax.export`
artifact (`export`).
"""
