"""TPU targets without a TPU: libtpu's compiler run on any CPU for a named Cloud TPU topology.

`topologies` names the targets and holds each chip's published figures; `train_programs`
lowers train.py's own programs onto a target's devices; `compile_report` compiles them and says
what each chip would need (train.py --config.compile_topology=...). `hlo` reads the optimized
programs.
"""
