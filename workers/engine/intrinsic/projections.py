"""Random projections P: R^d -> R^D for subspace training, theta = theta0 + P d
(Li et al., "Measuring the Intrinsic Dimension of Objective Landscapes", 2018).

All three are rebuilt from (kind, seed, D, d) alone, so an artifact stores only those numbers.
They are drawn on the CPU (seeded CPU generators) and then moved with ``to``, so a GPU run and a
CPU run of one seed use the same P.
Columns have unit norm (exactly for dense and sparse, in expectation for Fastfood), so
E ||P x||^2 = ||x||^2 for a random direction x.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch

from gpu_kernels.hadamard import fwht

Kind = Literal["dense", "sparse", "fastfood"]


class Projection(Protocol):
    D: int
    d: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device) -> Projection: ...


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Dense:
    """A materialized D x d Gaussian matrix with unit-norm columns: memory and time ~ D d."""

    def __init__(self, D: int, d: int, seed: int) -> None:
        self.D, self.d = D, d
        m = torch.randn(D, d, generator=_gen(seed))
        self.matrix = m / m.norm(dim=0, keepdim=True)

    def to(self, device: torch.device) -> Dense:
        self.matrix = self.matrix.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.matrix @ x
        return out


class Sparse:
    """Very sparse random projection (Li, Hastie, Church 2006): about sqrt(D) nonzeros per
    column, +-1 before normalization; memory and time ~ d sqrt(D)."""

    def __init__(self, D: int, d: int, seed: int) -> None:
        self.D, self.d = D, d
        g = _gen(seed)
        per_col = max(1, round(math.sqrt(D)))
        rows = torch.stack([torch.randperm(D, generator=g)[:per_col] for _ in range(d)], dim=1)
        signs = torch.randint(0, 2, (per_col, d), generator=g).float() * 2 - 1
        cols = torch.arange(d).expand(per_col, d)
        values = signs / math.sqrt(per_col)  # unit-norm columns
        self.matrix = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols.reshape(-1)]),
                                              values.reshape(-1), (D, d),
                                              check_invariants=True).coalesce()

    def to(self, device: torch.device) -> Sparse:
        self.matrix = self.matrix.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.sparse.mm(self.matrix, x.unsqueeze(1)).squeeze(1)
        return out


class Fastfood:
    """V = H G Pi H B per block of size L = 2^ceil(log2 d), stacked ceil(D / L) times and cut to D:
    B random signs, H the Walsh-Hadamard transform (the FWHT kernel, never a matrix), Pi a random
    permutation, G Gaussian scales. Memory ~ D, time ~ D log d."""

    def __init__(self, D: int, d: int, seed: int) -> None:
        self.D, self.d = D, d
        self.L = 1 << max(0, math.ceil(math.log2(max(d, 1))))
        self.blocks = math.ceil(D / self.L)
        g = _gen(seed)
        self.B = torch.randint(0, 2, (self.blocks, self.L), generator=g).float() * 2 - 1
        self.Pi = torch.stack([torch.randperm(self.L, generator=g) for _ in range(self.blocks)])
        self.G = torch.randn(self.blocks, self.L, generator=g)
        # With orthonormal H a block maps a unit vector to norm^2 ||G_b||^2 / L, so the stacked
        # column has norm^2 ~ blocks * mean(g^2); a fraction D / (blocks L) survives the cut.
        self.scale = math.sqrt(self.L / (D * float((self.G ** 2).mean())))

    def to(self, device: torch.device) -> Fastfood:
        self.B, self.Pi, self.G = self.B.to(device), self.Pi.to(device), self.G.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (0, self.L - x.shape[0]))
        y = fwht(self.B * padded)  # (blocks, L), normalized H; Triton on CUDA
        y = torch.gather(y, 1, self.Pi) * self.G
        y = fwht(y)
        return y.reshape(-1)[: self.D] * self.scale

    def dense(self) -> torch.Tensor:
        """The same operator as an explicit D x d matrix, from explicit H, G, Pi, B matrices
        (tests; small D only)."""
        from gpu_kernels.hadamard import hadamard_matrix

        h = hadamard_matrix(self.L).float() / math.sqrt(self.L)
        rows = []
        for b in range(self.blocks):
            perm = torch.eye(self.L)[self.Pi[b]]
            rows.append(h @ torch.diag(self.G[b]) @ perm @ h @ torch.diag(self.B[b]))
        return (torch.cat(rows)[: self.D, : self.d]) * self.scale


def memory_bytes(kind: Kind, D: int, d: int) -> int:
    """About what building a projection holds at its peak (Fastfood: O(D), left out)."""
    if kind == "dense":
        return 2 * 4 * D * d  # the Gaussian draw and its normalized copy
    if kind == "sparse":
        return 20 * max(1, round(math.sqrt(D))) * d  # two int64 indices and a float per nonzero
    return 0


def make(kind: Kind, D: int, d: int, seed: int) -> Projection:
    if kind == "dense":
        return Dense(D, d, seed)
    if kind == "sparse":
        return Sparse(D, d, seed)
    return Fastfood(D, d, seed)
