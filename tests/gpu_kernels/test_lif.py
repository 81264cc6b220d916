"""lif: the Triton kernels (interpreted on the CPU) against the reference loop over T in
float64, spikes and surrogate gradients; the dynamics by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_kernels.lif import lif, lif_reference, surrogate_grad


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_triton_matches_reference_in_float64(reset: str, surrogate: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 100, generator=gen) * 0.8 + 0.4  # ragged: 300 neurons, blocks of 256
    x64 = x.double().requires_grad_(True)
    want = lif_reference(x64, 0.85, 1.0, reset, surrogate, 2.5)  # type: ignore[arg-type]
    w = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (want * w).sum().backward()
    assert x64.grad is not None
    x32 = x.clone().requires_grad_(True)
    got = lif(x32, 0.85, 1.0, reset, surrogate, 2.5, impl="triton")  # type: ignore[arg-type]
    (got * w.float()).sum().backward()
    assert x32.grad is not None
    # identical spike trains (no membrane within fp32 rounding of the threshold here) ...
    assert torch.equal(got.detach().double(), want.detach())
    assert 0.1 < float(want.detach().mean()) < 0.9  # neurons really fire, and not always
    # ... and surrogate gradients through time within fp32 accumulation (relative L2)
    rel = (x32.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert float(rel) < 1e-5


def test_reference_dynamics_by_hand() -> None:
    x = torch.tensor([[0.6], [0.6], [0.6], [0.0]])
    # v: 0.6, 1.2 (spike; subtract: u = 0.2, zero: u = 0), then 0.8 / 0.6, 0.8 / 0.6
    assert lif_reference(x, beta=1.0).squeeze(1).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert lif(x, beta=1.0, reset="zero").squeeze(1).tolist() == [0.0, 1.0, 0.0, 0.0]
    x = torch.tensor([[0.6], [0.6], [0.6], [0.6]])
    assert lif(x, beta=1.0).squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0]  # 0.6 1.2 | 0.8 1.4
    assert lif(x, beta=1.0, reset="zero").squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert lif(x, beta=0.4).squeeze(1).tolist() == [0.0] * 4  # 0.6, 0.84, 0.94, 0.97: leaks below 1
    # tau: beta = exp(-1/tau)
    a = lif(x * 1.3, tau=2.0)
    assert torch.equal(a, lif(x * 1.3, beta=math.exp(-0.5)))


def test_surrogates_peak_at_the_threshold() -> None:
    z = torch.linspace(-2, 2, 401, dtype=torch.float64)
    for kind in ("atan", "sigmoid"):
        g = surrogate_grad(z, kind, 2.0)  # type: ignore[arg-type]
        assert int(g.argmax()) == 200 and torch.all(g > 0)
        # each integrates to ~1 over the real line: a smoothed Heaviside step
        wide = torch.linspace(-400, 400, 800001, dtype=torch.float64)
        area = float(torch.trapezoid(surrogate_grad(wide, kind, 2.0), wide))  # type: ignore[arg-type]
        assert abs(area - 1.0) < 2e-3


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_zero_time_steps_give_no_spikes(impl: str) -> None:
    # used to fail: an IndexError (x_seq[0]) on the reference, a reshape error on Triton
    x = torch.randn(0, 3, 5, requires_grad=True)
    out = lif(x, impl=impl)  # type: ignore[arg-type]
    assert out.shape == (0, 3, 5) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert lif_reference(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.gpu
def test_triton_on_cuda() -> None:
    x = torch.randn(16, 4096) * 0.8 + 0.4
    want = lif_reference(x.double())
    assert torch.equal(lif(x.cuda()).cpu().double(), want)
