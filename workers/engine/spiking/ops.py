"""Operation accounting: synaptic operations of a network on its real inputs, counted by forward
hooks, and the energy estimate they imply.

A weight layer whose input is exactly binary (spikes) costs one accumulate (AC) per active input
and connected output: on event-driven hardware only spikes trigger work, and a weight times 1 is
an addition. Any other input costs the dense multiply-accumulates (MAC) a conventional kernel
does. Biases and elementwise work (norms, the WKV recurrence, gates) are left out of both sides;
the LIF membrane updates, which only the spiking model does, are counted apart (``neuron_updates``).
A convolution's operations are the taps that read an input element: zero padding is no input
(and no synapse), so its taps count on neither side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# 45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014), the figures the SNN literature compares with.
PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6
ENERGY_NOTE = ("estimate, not a measurement: 0.9 pJ per accumulate and 4.6 pJ per "
               "multiply-accumulate (45 nm CMOS, 32-bit float); synaptic operations only, no "
               "memory traffic")


@dataclass
class LayerOps:
    name: str
    dense_macs: int = 0  # the layer evaluated conventionally on these inputs
    acs: int = 0
    macs: int = 0
    active: int = 0  # nonzero input elements (spiking inputs)
    inputs: int = 0
    binary: bool = True

    @property
    def input_rate(self) -> float | None:
        return self.active / self.inputs if self.binary and self.inputs else None


@dataclass
class NeuronStats:
    name: str
    spikes: int = 0
    updates: int = 0

    @property
    def rate(self) -> float:
        return self.spikes / self.updates if self.updates else 0.0


@dataclass
class Counts:
    layers: dict[str, LayerOps] = field(default_factory=dict)
    neurons: dict[str, NeuronStats] = field(default_factory=dict)

    @property
    def acs(self) -> int:
        return sum(r.acs for r in self.layers.values())

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers.values())

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.layers.values())

    @property
    def neuron_updates(self) -> int:
        return sum(n.updates for n in self.neurons.values())

    def energy_pj(self, with_neurons: bool = False) -> float:
        extra = self.neuron_updates if with_neurons else 0
        return PJ_PER_AC * self.acs + PJ_PER_MAC * (self.macs + extra)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _window_sums(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per sample, group and output position: the sum of float32 ``x`` over the inputs that
    position's window reads, padded as ``module.forward`` pads (zeros: nothing; reflect /
    replicate / circular: copies of real inputs), so out-of-bounds taps add nothing."""
    g = module.groups
    ones = torch.ones(g, module.in_channels // g, *module.kernel_size, device=x.device)
    padding: str | tuple[int, ...] = module.padding
    if module.padding_mode != "zeros":
        x = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    return nn.functional.conv2d(x, ones, None, module.stride, padding, module.dilation, g)


def _exact_sum(counts: torch.Tensor) -> int:
    """Sum of integer-valued float counts in int64: a float32 sum loses units past 2**24."""
    return int(counts.round().to(torch.int64).sum())


def count_layer(module: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(dense MACs, ACs if ``x`` is binary, active inputs) of one call of a weight layer."""
    from workers.engine.spiking.rwkv import MixLinear, token_shift

    if isinstance(module, MixLinear):
        rows = x.numel() // module.weight.shape[1]
        dense = rows * module.weight.numel()
        # each spike adds its weight column now (mu) and at the next token (1 - mu)
        active = int(torch.count_nonzero(x))
        return dense, (active + int(torch.count_nonzero(token_shift(x)))) * module.weight.shape[0], active
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features
        active = int(torch.count_nonzero(x))
        return rows * module.in_features * module.out_features, active * module.out_features, active
    if isinstance(module, nn.Conv2d):
        # Padding is no input: only the taps that read a real input element are synapses. A
        # spike-free pad costs no accumulate, and counting it as a MAC would inflate the twin.
        per_group = module.out_channels // module.groups
        sample = torch.ones(1, *x.shape[-3:], device=x.device)
        taps = _window_sums(module, sample)  # the same for every sample
        fan = _window_sums(module, (x != 0).float())  # active inputs per receptive field
        dense = _exact_sum(taps) * (x.numel() // sample.numel()) * per_group
        return dense, _exact_sum(fan) * per_group, int(torch.count_nonzero(x))
    raise TypeError(f"no operation count for {type(module).__name__}")


class OpCounter:
    """Count every Linear / Conv2d / MixLinear call and every LIF layer's spikes while active::

        with OpCounter(model) as ops:
            model(x)
        ops.counts.acs, ops.counts.macs
    """

    def __init__(self, model: nn.Module) -> None:
        from workers.engine.spiking.neurons import LIF
        from workers.engine.spiking.rwkv import MixLinear

        self.model = model
        self.counts = Counts()
        self._handles: list[Any] = []
        self._weights = [(n, m) for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Conv2d, MixLinear))]
        self._lifs = [(n, m) for n, m in model.named_modules() if isinstance(m, LIF)]

    def _on_weight(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0].detach()
            dense, acs, active = count_layer(module, x)
            row = self.counts.layers.setdefault(name, LayerOps(name))
            row.dense_macs += dense
            row.inputs += x.numel()
            if is_binary(x):
                row.acs += acs
                row.active += active
            else:
                row.binary = False
                row.macs += dense
        return hook

    def _on_lif(self, name: str) -> Any:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            st = self.counts.neurons.setdefault(name, NeuronStats(name))
            st.spikes += int(torch.count_nonzero(out))
            st.updates += out.numel()
        return hook

    def __enter__(self) -> OpCounter:
        self._handles = [m.register_forward_hook(self._on_weight(n)) for n, m in self._weights]
        self._handles += [m.register_forward_hook(self._on_lif(n)) for n, m in self._lifs]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
