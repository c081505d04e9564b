"""The networks (Flax linen): shared layers, RepMLPNet, the v1 RepMLP block, RepMLP-ResNet, the
pure-MLP CIFAR net, the factory that builds them by name, and stage-feature extraction.

Modules here depend on nothing else in the package.
"""
