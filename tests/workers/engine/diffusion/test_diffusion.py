"""Diffusion distillation on a case with a closed form: Gaussian data N(mu, s^2 I), whose
PF-ODE trajectories are straight lines in alpha-scaled coordinates, x_t / alpha_t =
mu + sqrt(s^2 + tan^2(pi t / 2)) z; plus the metric, the image writer and LoRA."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from workers.engine.diffusion import quality
from workers.engine.diffusion.distill import DistillConfig, distill, sample
from workers.engine.diffusion.nets import Denoiser, LoRALinear, add_lora
from workers.engine.diffusion.schedule import alpha, ddim_step, sigma, sl_point, solve

MU = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)


def exact_denoiser(s: float):  # type: ignore[no-untyped-def]
    """E[x0 | x_t] for x0 ~ N(MU, s^2 I)."""
    def d(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, g = alpha(t)[:, None], sigma(t)[:, None]
        return MU + a * s**2 / (a**2 * s**2 + g**2) * (x - a * MU)
    return d


def scale(t: torch.Tensor, s: float) -> torch.Tensor:
    """k_t = sqrt(s^2 + tan^2): x_t / alpha_t = MU + k_t z along one trajectory."""
    return torch.sqrt(s**2 + torch.tan(t * math.pi / 2) ** 2)


def origin(x: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
    """The closed-form PF-ODE solution at time 0 of the trajectory through (x, t)."""
    z = (x / alpha(t)[:, None] - MU) / scale(t, s)[:, None]
    return MU + s * z


@pytest.mark.parametrize("s", [0.0, 0.7])
def test_teacher_solver_reaches_the_closed_form(s: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    want = MU + s * x1  # at t = 1, alpha = 0 and sigma = 1: x_1 = z
    err = [float((solve(exact_denoiser(s), x1, n) - want).abs().max()) for n in (400, 1600)]
    if s == 0:  # a point mass: DDIM is exact in any number of steps
        assert max(err) < 1e-12
        assert torch.allclose(solve(exact_denoiser(s), x1, 1), want, atol=1e-12)
    else:  # first order: 4x the steps, a quarter of the error
        assert err[1] < 2.5e-3 and 3.5 < err[0] / err[1] < 4.5, err


def test_sl_ode_is_exact_on_the_gaussian_case() -> None:
    """Every point of the sub-path linear ODE between two points of one trajectory is (in
    alpha-scaled coordinates) a point of that same trajectory, so the target it is asked for,
    the trajectory's origin, is exact for every gamma."""
    s = 0.7
    gen = torch.Generator().manual_seed(1)
    n = 256
    x0 = MU + s * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    t = 0.3 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64)
    u = t - 0.25 * torch.rand(n, generator=gen, dtype=torch.float64)
    # one trajectory: its points at t and u in closed form
    z = (x0 - MU) / s
    x_t = alpha(t)[:, None] * (MU + scale(t, s)[:, None] * z)
    x_u = alpha(u)[:, None] * (MU + scale(u, s)[:, None] * z)
    assert torch.allclose(origin(x_t, t, s), x0) and torch.allclose(origin(x_u, u, s), x0)
    gamma = torch.rand(n, generator=gen, dtype=torch.float64)
    x_g = sl_point(x_t, x_u, t, u, gamma)
    assert torch.equal(sl_point(x_t, x_u, t, u, torch.ones(n, dtype=torch.float64)), x_t)
    # the trajectory point whose scale k_tau matches the interpolated one
    k = (1 - gamma) * scale(u, s) + gamma * scale(t, s)
    tau = torch.atan(torch.sqrt(k**2 - s**2)) * 2 / math.pi
    x_tau = alpha(tau)[:, None] * (MU + scale(tau, s)[:, None] * z)
    torch.testing.assert_close(x_g, (alpha(t) / alpha(tau))[:, None] * x_tau)
    torch.testing.assert_close(origin(x_tau, tau, s), x0)
    # and DDIM with the exact denoiser lands on the trajectory for a point mass only
    step = ddim_step(exact_denoiser(0.0)(x_t, t), x_t, t, u)
    assert torch.allclose(step, alpha(u)[:, None] * MU + sigma(u)[:, None] * (
        (x_t - alpha(t)[:, None] * MU) / sigma(t)[:, None]))


@pytest.mark.parametrize("method", ["slam", "cd"])
def test_one_step_student_matches_the_ode_solution(method: str) -> None:
    """Distilled from the exact Gaussian denoiser, the student maps noise to the closed-form
    ODE solution in one evaluation."""
    s = 0.7
    torch.manual_seed(0)
    student = Denoiser(dim=4, classes=1, hidden=64, depth=2)
    den = exact_denoiser(s)

    def teacher(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return den(x.double(), t.double()).float()

    gen = torch.Generator().manual_seed(2)
    x0 = (MU + s * torch.randn(4096, 4, generator=gen, dtype=torch.float64)).float()
    y = torch.zeros(len(x0), dtype=torch.long)
    # one hop from t to the grid's end, the teacher's ODE in 64 DDIM steps (DDIM's own error is
    # first order: see above); 1-step error after 3000 iterations: CD 2.8%, SLAM 5.6% of s
    cfg = DistillConfig(method=method, iterations=3000, lr=1e-3, grid_points=8, skip=8,  # type: ignore[arg-type]
                        teacher_substeps=64, ema=0.9)
    student, info = distill(student, teacher, x0, y, cfg)
    assert info["trainable_parameters"] == sum(p.numel() for p in student.parameters())
    labels = torch.zeros(2000, dtype=torch.long)
    got = sample(student, labels, 1, 4, seed=5).double()
    x1 = torch.randn(2000, 4, generator=torch.Generator().manual_seed(5))
    want = MU + s * x1.double()
    rel = float((got - want).pow(2).mean().sqrt()) / s
    assert rel < 0.1, rel


def test_frechet_distance_on_known_gaussians() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(20000, 3, generator=gen)
    assert quality.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + torch.tensor([1.0, 2.0, 0.0])
    assert quality.frechet(a, shifted) == pytest.approx(5.0, rel=1e-6)
    wide = a * 2  # same mean; covariance 4 I vs I: tr(I + 4I - 2 * 2I) = 3
    assert quality.frechet(a, wide) == pytest.approx(3.0, rel=0.05)


def test_png_grid_decodes() -> None:
    images = torch.zeros(6, 1, 8, 8)
    images[1] = 1.0
    blob = quality.png(images, rows=2, scale=2, pad=1)
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", blob[16:24])
    assert (w, h) == (3 * 17 + 1, 2 * 17 + 1)
    idat_len = struct.unpack(">I", blob[33:37])[0]
    raw = zlib.decompress(blob[41:41 + idat_len])
    rows = [raw[i * (w + 1) + 1:(i + 1) * (w + 1)] for i in range(h)]
    assert rows[1][1] == 255 and rows[1][18] == 0  # image 0 blank (white), image 1 full (black)


def test_lora_student_starts_as_the_teacher_and_trains_only_adapters() -> None:
    torch.manual_seed(0)
    net = Denoiser(dim=4, classes=1, hidden=32, depth=1)
    x, t, y = torch.randn(8, 4), torch.rand(8), torch.zeros(8, dtype=torch.long)
    before = net(x, t, y)
    wrapped = add_lora(net, rank=2, skip=("gamma",))
    assert "inp" in wrapped and "out" in wrapped and not any(w.startswith("gamma") for w in wrapped)
    assert torch.equal(net(x, t, y), before)  # B = 0
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) or n.startswith("gamma") for n in trainable)
    lora = next(m for m in net.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        net(x, t, y)
    assert lora.input_max > 0
