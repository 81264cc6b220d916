"""``char-gpt``: a small character-level GPT, the zoo's language model.

Trained deterministically on first use on ``data/corpus.txt`` (docstrings of Python's standard
library, shipped with the project; see ``scripts/build_corpus.py``), with the loss computed by
``gpu_kernels.linear_cross_entropy`` (the N x V logits are never materialized in training).
Tokens are ASCII bytes (vocabulary 128). Its forward returns next-character logits, so the
deployed ONNX model is a plain classifier per position and perplexity is measured on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workers.engine.datasets import TensorData

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VOCAB = 128
CONTEXT = 64
CHAR_GPT_VERSION = "v1"
# ~50 s on 2 CPU cores: held-out perplexity 7.4 (2.9 bits/char); 1500 steps reach 5.8 in 2 min.
CHAR_GPT_TRAIN: dict[str, Any] = {"seed": 0, "steps": 600, "batch_size": 32, "lr": 5e-3,
                                  "d_model": 128, "layers": 2, "heads": 4}


@lru_cache(maxsize=1)
def corpus_ids() -> torch.Tensor:
    data = CORPUS.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().clamp(max=VOCAB - 1)


def split(which: str) -> torch.Tensor:
    """First 90% of the corpus for training, the last 10% held out (evaluation, calibration)."""
    ids = corpus_ids()
    cut = int(len(ids) * 0.9)
    return ids[:cut] if which == "train" else ids[cut:]


def windows(which: str, n: int | None = None) -> TensorData:
    """Non-overlapping windows of the held-out text: inputs ``x`` [N, CONTEXT], labels the
    next characters [N, CONTEXT]."""
    ids = split(which)
    count = (len(ids) - 1) // CONTEXT
    if n is not None:
        count = min(count, n)
    idx = torch.arange(count)[:, None] * CONTEXT + torch.arange(CONTEXT)[None]
    return TensorData({"x": ids[idx]}, ids[idx + 1])


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.register_buffer("causal", torch.tril(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        # Written out (not SDPA) so the ONNX export is plain MatMul / Softmax.
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = self.causal[:t, :t]  # type: ignore[index]
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        out: torch.Tensor = x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))
        return out


class CharGPT(nn.Module):
    def __init__(self, d_model: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.ln(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.hidden(x))
        return out


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits [..., V] against targets [...]."""
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                     targets.reshape(-1))
    return float(torch.exp(ce))


class CharModel(Protocol):
    head: nn.Linear

    def hidden(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


def fit(model: CharModel, steps: int, batch_size: int, lr: float, seed: int,
        check: Callable[[int], None] | None = None) -> float:
    """Train a character model (``hidden`` -> ``head``) on random training windows with AdamW
    and one-cycle learning rates; the loss by ``linear_cross_entropy``. Returns seconds.
    ``check(step)`` is called before each step (progress, cancellation). Runs on the model's
    device; the windows are drawn on the CPU, so their order does not depend on it."""
    from gpu_kernels import linear_cross_entropy

    device = model.head.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Warm-up over 10% of the steps, but at least two: OneCycleLR divides by zero where its
    # warm-up ends on step 0 (10 steps, the spiking job's smallest, did).
    warmup = min(0.5, max(0.1, 2 / steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    t0 = time.perf_counter()
    for step in range(steps):
        if check is not None:
            check(step)
        start = torch.randint(0, len(ids) - CONTEXT - 1, (batch_size,), generator=gen)
        idx = start[:, None] + torch.arange(CONTEXT)[None]
        x, y = ids[idx].to(device), ids[idx + 1].to(device)
        h = model.hidden(x)
        loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head.weight, y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def held_out_perplexity(model: nn.Module) -> float:
    """Perplexity on the held-out windows, on the model's device."""
    test = windows("test")
    device = next(model.parameters()).device
    with torch.no_grad():
        assert test.labels is not None
        return perplexity(model(test.inputs["x"].to(device)), test.labels.to(device))


def train_char_gpt() -> tuple[CharGPT, dict[str, Any]]:
    cfg = CHAR_GPT_TRAIN
    torch.manual_seed(cfg["seed"])
    model = CharGPT(cfg["d_model"], cfg["layers"], cfg["heads"])
    model.train()
    seconds = fit(model, cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["seed"])
    model.eval()
    ppl = held_out_perplexity(model)
    meta = {"version": CHAR_GPT_VERSION, "train": cfg, "test_perplexity": ppl,
            "test_bits_per_char": math.log2(ppl), "train_seconds": round(seconds, 2),
            "corpus_bytes": len(corpus_ids()), "torch": torch.__version__}
    return model, meta
