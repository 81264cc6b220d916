"""Cross-entropy of a linear classifier head without materializing the N x V logits
(after "Cut Your Losses in Large-Vocabulary Language Models", 2024).

    loss_i = logsumexp_v(softcap(e_i . c_v)) - softcap(e_i . c_{t_i})

Forward: the correct-token logit by an indexed dot product; the log-sum-exp by a blockwise matmul
with an online (running max, running sum) reduction. Backward: the logit blocks are recomputed,
turned into softmax gradients, and blocks whose softmax values are all below ``filter_eps`` are
skipped (gradient filtering): their contribution is below the precision of the result.

Three implementations of one function:
- ``torch``: the reference, materializing the logits (``F.cross_entropy(e @ c.T)``).
- ``chunked``: plain PyTorch, ``chunk_rows x vocab_block`` logits at a time (the CPU path).
- ``triton``: fused kernels (``gpu_kernels._lce_triton``); on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn import functional as F

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "torch", "chunked", "triton"]


def _softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def default_filter_eps(dtype: torch.dtype) -> float:
    """Softmax values under the result dtype's resolution: 2^-12 for 16-bit (as in the paper),
    none for fp32 (exact gradients)."""
    return 2.0**-12 if dtype in (torch.bfloat16, torch.float16) else 0.0


def reference(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
              softcap: float | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    logits = _softcap((e @ c.T).float(), softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def _grad_rows(grad_out: torch.Tensor, valid: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """d(result)/d(loss_i) per row, zero on ignored rows."""
    n = valid.shape[0]
    if reduction == "none":
        g = grad_out.float()
    elif reduction == "sum":
        g = grad_out.float().expand(n)
    else:
        g = (grad_out.float() / valid.sum().clamp(min=1)).expand(n)
    return torch.where(valid, g, torch.zeros_like(g))


def _correct_logit(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                   softcap: float | None) -> torch.Tensor:
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    dot = (e.float() * c[safe].float()).sum(-1)  # indexed dot: N x D, never N x V
    return _softcap(dot, softcap)


# ---------------------------------------------------------------- chunked PyTorch path

def _chunked_lse(e: torch.Tensor, c: torch.Tensor, softcap: float | None, rows: int,
                 vblock: int) -> torch.Tensor:
    n = e.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=e.device)
    cf = c.float()
    for r0 in range(0, n, rows):
        er = e[r0:r0 + rows].float()
        acc = torch.full((er.shape[0],), float("-inf"), device=e.device)
        for v0 in range(0, c.shape[0], vblock):
            z = _softcap(er @ cf[v0:v0 + vblock].T, softcap)
            # online reduction: combine this block's log-sum-exp with the running one
            acc = torch.logaddexp(acc, torch.logsumexp(z, dim=1))
        lse[r0:r0 + rows] = acc
    return lse


def _chunked_backward(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, g: torch.Tensor, softcap: float | None, rows: int,
                      vblock: int, filter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad_e = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
    grad_c = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
    cf = c.float()
    for r0 in range(0, e.shape[0], rows):
        er, tr = e[r0:r0 + rows].float(), targets[r0:r0 + rows]
        gr, lr = g[r0:r0 + rows], lse[r0:r0 + rows]
        if not bool((gr != 0).any()):
            continue
        for v0 in range(0, c.shape[0], vblock):
            cb = cf[v0:v0 + vblock]
            z = _softcap(er @ cb.T, softcap)
            d = z.sub_(lr[:, None]).exp_() if softcap is None else torch.exp(z - lr[:, None])
            hit = (tr >= v0) & (tr < v0 + cb.shape[0])
            if filter_eps > 0 and not bool(hit.any()) and float(d.max()) < filter_eps:
                continue  # every softmax value here is below the result's precision
            rows_hit = hit.nonzero().squeeze(1)
            d[rows_hit, tr[rows_hit] - v0] -= 1.0
            d.mul_(gr[:, None])
            if softcap is not None:
                d.mul_(1.0 - (z / softcap) ** 2)
            grad_e[r0:r0 + rows].addmm_(d, cb)
            grad_c[v0:v0 + vblock].addmm_(d.T, er)
    return grad_e, grad_c


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, softcap: float | None, reduction: Reduction, impl: str,
                rows: int, vblock: int, filter_eps: float) -> torch.Tensor:
        valid = targets != ignore_index
        if impl == "triton":
            from gpu_kernels import _lce_triton

            lse = _lce_triton.lse_forward(e, c, softcap)
        else:
            lse = _chunked_lse(e, c, softcap, rows, vblock)
        loss = torch.where(valid, lse - _correct_logit(e, c, targets, valid, softcap),
                           torch.zeros_like(lse))
        ctx.save_for_backward(e, c, targets, lse, valid)
        ctx.cfg = (softcap, reduction, impl, rows, vblock, filter_eps, ignore_index)
        return _reduce(loss, valid, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        e, c, targets, lse, valid = ctx.saved_tensors
        softcap, reduction, impl, rows, vblock, filter_eps, _ = ctx.cfg
        g = _grad_rows(grad_out, valid, reduction)
        safe = torch.where(valid, targets, torch.full_like(targets, -1))
        if impl == "triton":
            from gpu_kernels import _lce_triton

            grad_e, grad_c = _lce_triton.backward(e, c, safe, lse, g, softcap, filter_eps)
        else:
            grad_e, grad_c = _chunked_backward(e, c, safe, lse, g, softcap, rows, vblock,
                                               filter_eps)
        return (grad_e.to(e.dtype), grad_c.to(c.dtype), None, None, None, None, None, None,
                None, None)


def linear_cross_entropy(
    embeddings: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    chunk_rows: int = 1024,
    vocab_block: int = 4096,
    filter_eps: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``embeddings (N, D) @ classifier (V, D).T`` against ``targets (N,)``.

    Works in fp32 / bf16 / fp16 (accumulation in fp32), with autograd for both inputs.
    ``impl="auto"``: Triton on CUDA, the chunked path elsewhere. Leading dimensions of
    ``embeddings`` and ``targets`` are flattened.
    """
    if embeddings.shape[-1] != classifier.shape[-1]:
        raise ValueError(f"embeddings have D={embeddings.shape[-1]} but the classifier has "
                         f"D={classifier.shape[-1]}")
    e = embeddings.reshape(-1, embeddings.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} embeddings but {t.shape[0]} targets")
    if impl == "auto":
        impl = "triton" if e.is_cuda else "chunked"
    if impl == "torch":
        out = reference(e, classifier, t, ignore_index, softcap, reduction)
    else:
        eps = default_filter_eps(e.dtype) if filter_eps is None else filter_eps
        out = _LinearCrossEntropy.apply(e, classifier, t, ignore_index, softcap, reduction, impl,
                                        chunk_rows, vocab_block, eps)
    if reduction == "none":
        return out.reshape(targets.shape)
    return out
