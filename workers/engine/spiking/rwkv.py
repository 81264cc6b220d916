"""A small RWKV character language model and its spiking twin (SpikeGPT, Zhu et al. 2023).

Both have exactly the same parameters. RWKV mixes tokens in linear time: token shift (each
projection sees ``mu * x_t + (1 - mu) * x_{t-1}``) and the WKV recurrence, a decaying
softmax-weighted sum over past values per channel. The spiking model puts LIF neurons, running
over the token axis, in front of every weight layer, so every projection (and the head) reads
binary spikes: its matrix products are accumulates on the active inputs. The WKV recurrence and
the gates stay real-valued in both, as in SpikeGPT.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.engine.char_lm import CONTEXT, VOCAB
from workers.engine.spiking.neurons import LIF


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> the previous token's values (zeros at t = 0)."""
    return nn.functional.pad(x, (0, 0, 1, -1))


class MixLinear(nn.Module):
    """``W (mu * x_t + (1 - mu) * x_{t-1})`` on (B, T, C): token shift fused into a projection.
    On spikes, that is ``W diag(mu)`` on this token's spikes plus ``W diag(1 - mu)`` on the
    previous token's: accumulates only (see ``ops.count_layer``)."""

    def __init__(self, d_in: int, d_out: int, mu: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.mu = nn.Parameter(mu.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * self.mu + token_shift(x) * (1 - self.mu), self.weight)


def _ramp(d: int, layer: int, layers: int) -> torch.Tensor:
    """RWKV's initial token-shift mix: later channels and deeper layers look back less."""
    return (torch.arange(d) / d) ** (1 - layer / max(1, layers))


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RWKV-4's WKV on (B, T, C), token by token: output t is the average of v_i (i <= t)
    weighted by exp(k_i - (t - 1 - i) e^w) for i < t and exp(u + k_t) for i = t. The state
    (numerator, denominator, their common exponent) is kept rescaled so nothing overflows."""
    decay = torch.exp(w)
    num = torch.zeros_like(k[:, 0])
    den = torch.zeros_like(k[:, 0])
    top = torch.full_like(k[:, 0], -1e38)
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        now = u + kt
        p = torch.maximum(top, now)
        e1, e2 = torch.exp(top - p), torch.exp(now - p)
        out.append((e1 * num + e2 * vt) / (e1 * den + e2))
        past = top - decay
        p = torch.maximum(past, kt)
        e1, e2 = torch.exp(past - p), torch.exp(kt - p)
        num, den, top = e1 * num + e2 * vt, e1 * den + e2, p
    return torch.stack(out, dim=1)


def _spikes(lif: LIF | None, x: torch.Tensor) -> torch.Tensor:
    """LIF over the token axis of (B, T, C); identity for the twin."""
    if lif is None:
        return x
    out: torch.Tensor = lif(x.transpose(0, 1)).transpose(0, 1)
    return out


class Block(nn.Module):
    def __init__(self, d: int, layer: int, layers: int, spiking: bool, beta: float) -> None:
        super().__init__()
        ramp = _ramp(d, layer, layers)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # token mixing
        self.key = MixLinear(d, d, ramp)
        self.value = MixLinear(d, d, ramp + 0.3 * layer / max(1, layers))
        self.receptance = MixLinear(d, d, ramp ** 0.5)
        self.output = nn.Linear(d, d, bias=False)
        self.time_decay = nn.Parameter(torch.linspace(-5, 1, d))
        self.time_first = nn.Parameter(torch.full((d,), math.log(0.3)))
        # channel mixing
        self.ffn_key = MixLinear(d, 4 * d, ramp)
        self.ffn_receptance = MixLinear(d, d, ramp)
        self.ffn_value = nn.Linear(4 * d, d, bias=False)
        # before the projections, the output, the channel-mix projections and its value layer
        lifs: list[LIF | None] = [LIF(beta) for _ in range(4)] if spiking else [None] * 4
        self.lif_att, self.lif_out, self.lif_ffn, self.lif_hidden = lifs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = _spikes(self.lif_att, self.ln1(x))
        k, v, r = self.key(s), self.value(s), self.receptance(s)
        y = torch.sigmoid(r) * wkv(self.time_decay, self.time_first, k, v)
        x = x + self.output(_spikes(self.lif_out, y))
        s = _spikes(self.lif_ffn, self.ln2(x))
        hidden = torch.relu(self.ffn_key(s)) ** 2
        out: torch.Tensor = x + torch.sigmoid(self.ffn_receptance(s)) * self.ffn_value(
            _spikes(self.lif_hidden, hidden))
        return out


class RWKVLM(nn.Module):
    """Character RWKV (``spiking=False``) or SpikeGPT (``spiking=True``): the same parameters."""

    def __init__(self, d_model: int = 128, layers: int = 2, spiking: bool = False,
                 beta: float = 0.9) -> None:
        super().__init__()
        self.config = {"d_model": d_model, "layers": layers, "spiking": spiking, "beta": beta}
        self.tok = nn.Embedding(VOCAB, d_model)
        self.ln_in = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(Block(d_model, i, layers, spiking, beta) for i in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.lif_head = LIF(beta) if spiking else None
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input (B, T, d): spikes for SpikeGPT."""
        h = self.ln_in(self.tok(x))
        for block in self.blocks:
            h = block(h)
        return _spikes(self.lif_head, self.ln(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.hidden(x))
        return out

    @torch.no_grad()
    def generate(self, prompt: str, n: int, temperature: float = 0.7, seed: int = 0) -> str:
        """Sample ``n`` characters after ``prompt`` (the last CONTEXT characters as context)."""
        gen = torch.Generator().manual_seed(seed)
        ids = [min(b, VOCAB - 1) for b in prompt.encode("ascii", "replace")] or [10]
        device = self.head.weight.device
        for _ in range(n):
            logits = self(torch.tensor([ids[-CONTEXT:]], device=device))[0, -1] / temperature
            # drawn on the CPU: the generator is a CPU one, and a seed gives one text anywhere
            ids.append(int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen)))
        return bytes(ids[len(prompt):] if prompt else ids[1:]).decode("ascii", "replace")
