"""Training: the loop (`trainer.train_and_evaluate`), the jitted experiment functions, optimizer,
sharding, checkpoints and metric writers.
"""
