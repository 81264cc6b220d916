"""Triton kernels run on the CPU through Triton's interpreter here. The variable must be set
before triton is first imported, hence at import time of this conftest."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
