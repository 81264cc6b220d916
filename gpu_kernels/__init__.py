"""Compiled kernels (Triton) with PyTorch references; see issue 4."""
