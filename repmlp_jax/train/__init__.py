"""Training: what `train.py` runs.

Belongs here: the loop (`trainer.train_and_evaluate`: evaluation, checkpoints, fine-tuning from a
saved model), the jitted computations of a run (`experiment.Experiment`, and `derive_steps`,
the one place where epochs become steps), the optimizer and schedule (`optim`), device meshes and
shardings (`sharding`), orbax training checkpoints (`checkpointing`; `recovery`: resuming after a damaged checkpoint
or a changed config), the authors' EMA rule (`ema`) and metric writers
(`metric_writers`). Models, data and reparam come from their own packages.
"""
