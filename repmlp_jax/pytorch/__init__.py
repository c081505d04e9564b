"""PyTorch interop: the authors' and mmpretrain's checkpoints in, the authors' layout out.

Belongs here: safe reading of .pth files (`files`), what every key map shares (`mapping`: the
complete key report, `DetectionError`), one key map per model family (`keys_repmlpnet`,
`keys_resnet`: pure numpy, no torch and no orbax, registered in `repmlp_jax.families`), and
loading and saving (`importer.load_torch`, `exporter.save_torch`). Torch itself is imported only
when a file is read or written (an optional dependency).
"""
