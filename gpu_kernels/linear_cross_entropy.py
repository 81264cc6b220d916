"""Cross-entropy of a linear classifier head without materializing the N x V logits
(the Cut Cross-Entropy method of "Cut Your Losses in Large-Vocabulary Language Models", 2024).

    loss_i = logsumexp_v(softcap(e_i . c_v)) - softcap(e_i . c_{t_i})

Forward: the correct-token logit by an indexed dot product (N x D, never N x V); the
log-sum-exp by a blockwise matmul with an online (running max, running sum) reduction.
Backward: logit blocks are recomputed and turned into softmax gradients; a block whose softmax
values are all below ``filter_eps`` and that holds no target is skipped (gradient filtering:
its contribution is below the precision of the result). Optionally the vocabulary is visited in
order of decreasing mean logit (``sort_vocab``), which gathers the non-negligible entries into
few blocks so that more blocks are skipped.

Three implementations of one function:
- ``torch``: the reference, materializing the logits (``F.cross_entropy(e @ c.T)``).
- ``chunked``: plain PyTorch, ``chunk_rows x vocab_block`` logits at a time (the CPU path).
- ``triton``: fused kernels (``gpu_kernels._lce_triton``); on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "torch", "chunked", "triton"]


@dataclass
class FilterStats:
    """Filled by the backward of the chunked and Triton paths when passed as ``stats``."""

    blocks: int = 0  # (row block, vocabulary block) pairs visited
    skipped: int = 0  # of which skipped by gradient filtering


@dataclass(frozen=True)
class _Config:
    ignore_index: int
    softcap: float | None
    reduction: Reduction
    impl: Literal["chunked", "triton"]
    chunk_rows: int
    vocab_block: int
    filter_eps: float
    sort_vocab: bool
    stats: FilterStats | None


def _softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def default_filter_eps(dtype: torch.dtype) -> float:
    """The paper's (and its package's) threshold: the dtype's machine epsilon / 32, i.e. 2^-12
    for bf16, 2^-15 for fp16, 2^-28 for fp32."""
    return float(torch.finfo(dtype).eps) / 32


def reference(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
              softcap: float | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Materialized logits: N x V memory (the baseline). Same semantics as the other paths:
    int32 or int64 targets, and "mean" is 0 (gradients 0) when every target is ignored."""
    logits = _softcap((e @ c.T).float(), softcap)
    t = targets.long()
    if reduction != "mean":
        return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)
    total = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    return total / (t != ignore_index).sum().clamp(min=1)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def _grad_rows(grad_out: torch.Tensor, valid: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """d(result)/d(loss_i) per row, zero on ignored rows."""
    g = grad_out.float()
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1)
    g = g.expand(valid.shape[0])
    return torch.where(valid, g, torch.zeros_like(g))


def _correct_logit(e: torch.Tensor, c: torch.Tensor, safe_targets: torch.Tensor,
                   softcap: float | None) -> torch.Tensor:
    dot = (e.float() * c[safe_targets].float()).sum(-1)  # indexed dot product, N x D
    return _softcap(dot, softcap)


# ---------------------------------------------------------------- chunked PyTorch path

def _chunked_lse(e: torch.Tensor, c: torch.Tensor, cfg: _Config, colsum: torch.Tensor | None
                 ) -> torch.Tensor:
    """Log-sum-exp per row; with ``colsum``, also the per-vocabulary sum of logits (for
    sorting). Peak extra memory: one chunk_rows x vocab_block block and a temporary."""
    n, v = e.shape[0], c.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=e.device)
    for r0 in range(0, n, cfg.chunk_rows):
        er = e[r0:r0 + cfg.chunk_rows].float()
        m = torch.full((er.shape[0],), float("-inf"), device=e.device)
        s = torch.zeros(er.shape[0], device=e.device)
        for v0 in range(0, v, cfg.vocab_block):
            z = er @ c[v0:v0 + cfg.vocab_block].float().T
            if cfg.softcap is not None:
                z.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
            if colsum is not None:
                colsum[v0:v0 + z.shape[1]] += z.sum(0)
            # online softmax: rescale the running sum to the new running max
            m_new = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(1)
            m = m_new
        lse[r0:r0 + cfg.chunk_rows] = m + s.log()
    return lse


def _chunked_backward(e: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, lse: torch.Tensor,
                      g: torch.Tensor, order: torch.Tensor | None, cfg: _Config,
                      need_e: bool, need_c: bool
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients by recomputed blocks. ``pos``: each row's target position in visiting order
    (-1 for ignored rows); ``order``: the visiting order of the vocabulary (None: identity)."""
    n, v = e.shape[0], c.shape[0]
    grad_e = torch.zeros(e.shape, dtype=torch.float32, device=e.device) if need_e else None
    grad_c = torch.zeros(c.shape, dtype=torch.float32, device=c.device) if need_c else None
    eps = cfg.filter_eps
    for r0 in range(0, n, cfg.chunk_rows):
        gr = g[r0:r0 + cfg.chunk_rows]
        if not bool((gr != 0).any()):
            continue  # every row ignored
        er, pr, lr = e[r0:r0 + cfg.chunk_rows].float(), pos[r0:r0 + cfg.chunk_rows], \
            lse[r0:r0 + cfg.chunk_rows, None]
        er_g = er * gr[:, None]  # d(result)/d(loss_i) folded into the rows: grad_c = dᵀ (g e)
        ge = torch.zeros_like(er) if need_e else None
        for v0 in range(0, v, cfg.vocab_block):
            idx = None if order is None else order[v0:v0 + cfg.vocab_block]
            cb = (c[v0:v0 + cfg.vocab_block] if idx is None else c.index_select(0, idx)).float()
            z = er @ cb.T
            dcap = None
            if cfg.softcap is not None:
                z.div_(cfg.softcap).tanh_()
                dcap = 1.0 - z * z  # d softcap(x) / dx = 1 - tanh²
                z.mul_(cfg.softcap)
            p = z.sub_(lr).exp_()  # softmax block, in place of the logits
            hit = ((pr >= v0) & (pr < v0 + cb.shape[0])).nonzero().squeeze(1)
            if cfg.stats is not None:
                cfg.stats.blocks += 1
            if eps > 0 and hit.numel() == 0 and float(p.max()) < eps:
                if cfg.stats is not None:
                    cfg.stats.skipped += 1
                continue
            p[hit, pr[hit] - v0] -= 1.0  # softmax - one_hot(target)
            if dcap is not None:
                p.mul_(dcap)
            if ge is not None:
                ge.addmm_(p, cb)
            if grad_c is not None:
                if idx is None:
                    grad_c[v0:v0 + cb.shape[0]].addmm_(p.T, er_g)
                else:
                    grad_c.index_add_(0, idx, p.T @ er_g)
        if grad_e is not None and ge is not None:
            grad_e[r0:r0 + cfg.chunk_rows] = ge.mul_(gr[:, None])
    return grad_e, grad_c


# ---------------------------------------------------------------- autograd

def _lse(e: torch.Tensor, c: torch.Tensor, cfg: _Config, colsum: torch.Tensor | None
         ) -> torch.Tensor:
    if cfg.impl == "triton":
        from gpu_kernels import _lce_triton

        return _lce_triton.lse_forward(e, c, cfg.softcap, colsum)
    return _chunked_lse(e, c, cfg, colsum)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                cfg: _Config) -> torch.Tensor:
        valid = targets != cfg.ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        # the mean logit per vocabulary entry orders the backward's blocks; only worth its
        # pass when a backward will filter
        sort = cfg.sort_vocab and cfg.filter_eps > 0 and any(ctx.needs_input_grad[:2])
        colsum = torch.zeros(c.shape[0], dtype=torch.float32, device=c.device) if sort else None
        lse = _lse(e, c, cfg, colsum)
        loss = torch.where(valid, lse - _correct_logit(e, c, safe, cfg.softcap),
                           torch.zeros_like(lse))
        ctx.save_for_backward(e, c, targets, lse, valid, *(() if colsum is None else (colsum,)))
        ctx.cfg = cfg
        return _reduce(loss, valid, cfg.reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e, c, targets, lse, valid, *rest = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        need_e, need_c = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        g = _grad_rows(grad_out, valid, cfg.reduction)
        order = torch.argsort(rest[0], descending=True) if rest else None
        grad_e: torch.Tensor | None
        grad_c: torch.Tensor | None
        if cfg.impl == "triton":
            from gpu_kernels import _lce_triton

            tgt = torch.where(valid, targets, torch.full_like(targets, -1))
            grad_e, grad_c = _lce_triton.backward(e, c, tgt, lse, g, cfg.softcap, cfg.filter_eps,
                                                  order, cfg.stats)
            grad_e = grad_e if need_e else None
            grad_c = grad_c if need_c else None
        else:
            if order is None:
                pos = targets
            else:  # position of each target in the visiting order
                inv = torch.empty_like(order)
                inv[order] = torch.arange(order.shape[0], device=order.device)
                pos = inv[torch.where(valid, targets, torch.zeros_like(targets))]
            pos = torch.where(valid, pos, torch.full_like(pos, -1))
            grad_e, grad_c = _chunked_backward(e, c, pos, lse, g, order, cfg, need_e, need_c)
        return (None if grad_e is None else grad_e.to(e.dtype),
                None if grad_c is None else grad_c.to(c.dtype), None, None)


def _check_targets(t: torch.Tensor, v: int, ignore_index: int) -> None:
    """Class indices in [0, V) or ``ignore_index``: anything else would index the classifier out
    of bounds (a crash, or a device-side assert on CUDA) or, negative, wrap around silently."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, not {t.dtype}")
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target {int(t[i])} (position {i}) is outside the vocabulary "
                         f"[0, {v}) and is not ignore_index ({ignore_index})")


def linear_cross_entropy(
    embeddings: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    *,
    filter_eps: float | None = None,
    sort_vocab: bool = False,
    chunk_rows: int = 2048,
    vocab_block: int = 2048,
    stats: FilterStats | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``embeddings (N, D) @ classifier (V, D).T`` against ``targets (N,)``.

    fp32 / bf16 / fp16 inputs, accumulation in fp32, autograd for both inputs; leading
    dimensions of ``embeddings`` and ``targets`` are flattened (``reduction="none"`` returns
    ``targets``' shape, 0 on ignored positions; ``"mean"`` averages over the positions not
    ignored, and is 0 with zero gradients when all are). ``targets``: int32 or int64, each in
    [0, V) or ``ignore_index`` (else ValueError; the check costs one synchronization on CUDA).
    ``softcap``: None or positive. ``impl="auto"``: Triton on CUDA, the chunked
    path elsewhere. ``filter_eps``: gradient-filtering threshold (None: the dtype's eps / 32;
    0 disables filtering). ``chunk_rows`` / ``vocab_block``: the chunked path's block (its
    extra memory is a few such fp32 blocks).
    """
    if embeddings.shape[-1] != classifier.shape[-1] or classifier.dim() != 2:
        raise ValueError(f"embeddings (..., {embeddings.shape[-1]}) do not match the classifier "
                         f"{tuple(classifier.shape)} (want (V, D))")
    e = embeddings.reshape(-1, embeddings.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} embeddings but {t.shape[0]} targets")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), not {softcap}")
    _check_targets(t, classifier.shape[0], ignore_index)
    if impl == "auto":
        impl = "triton" if e.is_cuda else "chunked"
    if impl == "torch":
        out = reference(e, classifier, t, ignore_index, softcap, reduction)
    elif impl in ("chunked", "triton"):
        if chunk_rows < 1 or vocab_block < 1:
            raise ValueError("chunk_rows and vocab_block must be positive")
        eps = default_filter_eps(e.dtype) if filter_eps is None else float(filter_eps)
        cfg = _Config(ignore_index, softcap, reduction, impl, chunk_rows, vocab_block, eps,
                      sort_vocab, stats)
        out = _LinearCrossEntropy.apply(e, classifier, t, cfg)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return out.reshape(targets.shape) if reduction == "none" else out
