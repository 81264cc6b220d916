from __future__ import annotations

import pytest
import torch

from gpu_kernels.lif import lif, lif_reference


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_triton_matches_reference_in_float64(reset: str, surrogate: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 3, 100, generator=gen) * 0.8 + 0.4)  # ragged: 300 neurons, block 256
    x64 = x.double().requires_grad_(True)
    want = lif_reference(x64, 0.85, 1.0, reset, surrogate, 2.5)  # type: ignore[arg-type]
    w = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (want * w).sum().backward()
    assert x64.grad is not None
    x32 = x.clone().requires_grad_(True)
    got = lif(x32, 0.85, 1.0, reset, surrogate, 2.5, impl="triton")  # type: ignore[arg-type]
    (got * w.float()).sum().backward()
    assert x32.grad is not None
    assert torch.equal(got.detach().double(), want.detach())  # identical spike trains
    assert 0.05 < float(want.detach().mean()) < 0.95  # neurons really fire, and not always
    rel = (x32.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert float(rel) < 1e-5


def test_reference_dynamics_by_hand() -> None:
    x = torch.tensor([[0.6], [0.6], [0.6], [0.0]])
    s = lif_reference(x, beta=1.0, threshold=1.0)
    # v: 0.6, 1.2 (spike, u=0.2), 0.8, 0.8
    assert s.squeeze(1).tolist() == [0.0, 1.0, 0.0, 0.0]
