"""What the mixed-precision search asks of a backend, and the timing every backend shares.

A backend wraps one float model: it says which op each quantizable layer became, which formats
it runs for a layer (and in which exact arithmetic, for the simulation), and realizes a per-layer
config as a :class:`Deployed` model built on its real kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from workers.engine.quant.formats import LayerFormat


class Deployed(Protocol):
    """A realized config: run it, time it, ship it."""

    @property
    def size_bytes(self) -> int: ...

    def run(self, inputs: Sequence[torch.Tensor]) -> np.ndarray: ...

    def latency_ms(self, inputs: Sequence[torch.Tensor], warmup: int, repeats: int
                   ) -> list[float]: ...

    def artifact(self) -> tuple[str, bytes]:
        """(file name, bytes) of the deployable model."""
        ...


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def device(self) -> torch.device:
        """Where the realized models run (the report's environment describes it)."""
        ...

    @property
    def op_of(self) -> Mapping[str, str]:
        """Quantizable layer -> the op type it runs as on this backend."""
        ...

    def supports(self, layer: str, fmt: LayerFormat) -> bool: ...

    def native_format(self, layer: str, fmt: LayerFormat) -> LayerFormat:
        """``fmt`` with the arithmetic this backend really uses for ``layer``."""
        ...

    def realize(self, config: Mapping[str, LayerFormat]) -> Deployed: ...

    def rebuilt(self, module: nn.Module) -> Backend:
        """The same backend over another module of the same architecture (merged adapters)."""
        ...

    def default_levels(self, has_conv: bool) -> list[str]:
        """The precisions to descend through when the spec names none."""
        ...

    def describe(self) -> str:
        """The kernels behind each precision, for the report's method line."""
        ...


def interleaved_latency(deployed: Mapping[str, Deployed], inputs: Sequence[torch.Tensor],
                        warmup: int, repeats: int, rounds: int = 5) -> dict[str, list[float]]:
    """Time several models round-robin: ``rounds`` passes (fewer where ``repeats`` is
    smaller), each running every model about ``repeats / rounds`` times, ``repeats`` timed
    runs per model in all (what the reports say). On a machine whose load drifts (other jobs,
    other tenants), drift then hits every configuration alike instead of whichever was timed
    last."""
    for d in deployed.values():
        d.latency_ms(inputs, warmup, 0)
    repeats = max(1, repeats)
    rounds = max(1, min(rounds, repeats))
    per_round, extra = divmod(repeats, rounds)
    samples: dict[str, list[float]] = {k: [] for k in deployed}
    for r in range(rounds):
        for key, d in deployed.items():
            samples[key] += d.latency_ms(inputs, 0, per_round + (r < extra))
    return samples


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors, each counted once: tied parameters (a language
    model's head and embedding) appear under several names but are stored once."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(state).values())


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each name of ``state`` that aliases a tensor listed under an earlier name (the same
    memory with the same dtype, shape and strides: tied parameters) -> that earlier name."""
    first: dict[tuple[object, ...], str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if not t.numel():
            continue
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the names :func:`tied_names` finds."""
    tied = tied_names(state)
    return {k: v for k, v in state.items() if k not in tied}


def run_batched(model: Deployed, inputs: Sequence[torch.Tensor], batch: int) -> np.ndarray:
    outs = [model.run(tuple(t[i:i + batch] for t in inputs)) for i in range(0, len(inputs[0]), batch)]
    return np.concatenate(outs).astype("float32")
