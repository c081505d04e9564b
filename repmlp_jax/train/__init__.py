"""Training: the loop (`trainer.train_and_evaluate`), the jitted experiment functions, optimizer,
sharding, checkpoints (and resuming after a damaged checkpoint or a changed config) and metric
writers.
"""
