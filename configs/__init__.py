"""Experiment configs for train.py: one file per experiment, shared defaults in common.py."""
