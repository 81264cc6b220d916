"""Triton kernels run on the CPU through Triton's interpreter where there is no GPU. The
interpreter is chosen when a kernel is decorated, i.e. when a ``gpu_kernels._*_triton`` module is
first imported; ``gpu_kernels`` imports those lazily, so setting the variable here, at conftest
import time (before any test module is collected), is early enough."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These tests use tiny tensors: on a loaded 2-core machine, waking a second OpenMP thread
    # costs milliseconds per op, more than the op itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
