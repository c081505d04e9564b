"""PyTorch interop: safe reading of .pth files, one key map per model family, load and save.

Torch itself is imported only when a file is read or written (an optional dependency).
"""
