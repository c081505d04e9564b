"""What the command-line scripts (train.py, convert.py, predict.py) share and run.

Belongs here: the conversions behind convert.py (`convert`), the one-line error messages and exit
statuses of every command (`cli`), and JAX's persistent compilation cache as the commands turn it
on (`compilation_cache`). The scripts themselves stay thin: they parse flags and call in here or
into the library.
"""
