"""Replaying the shared prefix of leave-one-out evaluations.

The inter-layer term restores one layer at a time in the fully quantized model. Until that
layer is first called, the forward pass computes exactly what the fully quantized one did, so
every module that finished before then can return its recorded output instead of computing
it again: on a transformer, restoring a layer of block k skips blocks 0..k-1. A module is
replayed only where that is safe: it is called once per forward in every batch, it is not
a layer whose format the evaluation sets (the simulation hooks those), it carries no hooks of
its own, it changes none of its inputs in place and its output shares no memory with them,
it shares no weight with the restored layer, and its output is made of tensors (in tuples,
lists or dicts), cloned on the way in and out so that in-place ops downstream cannot change
the record. Python state a module sets as a side effect is not replayed.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import QuantTask

# Recorded outputs for the whole calibration set stay under this (MiniLM at the default 128
# calibration sentences would record 843 MB for every module it could replay).
BUDGET_BYTES = 256 << 20


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> bool:
    """Tensors, numbers and None in tuples, lists and dicts: what _clone copies faithfully."""
    if isinstance(value, torch.Tensor | int | float | bool | type(None)):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(_plain(v) for v in value.values())
    return False


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


_END = object()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter: unknown
        return None


def _ancestors(name: str) -> Iterator[str]:
    while name:
        name = name.rpartition(".")[0]
        yield name


def _storages(mod: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in itertools.chain(mod.parameters(), mod.buffers())}


class PrefixReplay:
    """Which modules each restored layer can replay, and their recorded outputs."""

    def __init__(self, module: nn.Module, skip: dict[str, list[str]], nbytes: int) -> None:
        self.module = module
        self.skip = skip  # restored layer -> outermost modules finished before its first call
        self.nbytes = nbytes  # the records' size, estimated from the traced batch
        self.records: dict[str, list[Any]] = {n: [] for n in {m for ms in skip.values() for m in ms}}

    @classmethod
    def plan(cls, task: QuantTask, layers: Sequence[str]) -> PrefixReplay | None:
        """Trace one calibration batch's calls; None where nothing can be replayed within
        BUDGET_BYTES. ``record`` checks the plan on every batch."""
        mods = dict(task.module.named_modules())
        names = {id(m): n for n, m in mods.items()}
        tick = 0
        start: dict[str, int] = {}
        end: dict[str, int] = {}
        calls: Counter[str] = Counter()
        size: dict[str, int] = {}
        began: dict[str, float] = {}
        seconds: dict[str, float] = {}
        plain: dict[str, bool] = {}
        versions: dict[str, list[tuple[torch.Tensor, int | None]]] = {}

        def pre(mod: nn.Module, args: Any, kwargs: Any) -> None:
            nonlocal tick
            name = names[id(mod)]
            calls[name] += 1
            start.setdefault(name, tick)
            began.setdefault(name, time.perf_counter())
            versions.setdefault(name, [(t, _version(t)) for t in _tensors((args, kwargs))])
            tick += 1

        def post(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            nonlocal tick
            name = names[id(mod)]
            end[name] = tick
            seconds.setdefault(name, time.perf_counter() - began[name])
            tick += 1
            size[name] = _nbytes(out)
            # A module that changed an input in place, or whose output shares memory with an
            # input (an identity), may be used through that input, which a replay would skip.
            ins = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            plain[name] = (_plain(out)
                           and all(v is not None and _version(t) == v for t, v in versions[name])
                           and not any(t.untyped_storage().data_ptr() in ins
                                       for t in _tensors(out)))

        quantized = set(task.layers)
        candidates = {n: m for n, m in mods.items() if n and n not in quantized
                      and not m._forward_hooks and not m._forward_pre_hooks
                      and "forward" not in vars(m)}
        others = [m for m in mods.values() if m is not task.module]
        hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in others]
        hooks += [m.register_forward_hook(post, with_kwargs=True) for m in others]
        try:
            # no_grad, not inference_mode: in-place changes show in the version counters.
            with torch.no_grad():
                task.module(*(t[:task.batch_size].clone() for t in task.calib_inputs))
        finally:
            for h in hooks:
                h.remove()
        ok = {n for n in candidates if calls[n] == 1 and plain.get(n, False)}
        # A module sharing a weight with the restored layer (tied weights) would see it change.
        shared = {n: _storages(mods[n]) for n in ok}
        skip: dict[str, list[str]] = {}
        for layer in layers:
            if layer not in start:
                continue
            own = _storages(task.layers[layer])
            done = {n for n in ok if end[n] < start[layer] and not shared[n] & own}
            # Outermost only: an ancestor that finished before the layer covers the rest.
            skip[layer] = sorted((n for n in done if not any(a in done for a in _ancestors(n))),
                                 key=lambda n: start[n])
        # Within the budget, keep the records that save the most time per byte: a module's
        # traced time x how many restored layers replay it, over its records' size.
        uses = Counter(m for ms in skip.values() for m in ms)
        batches = -(-len(task.calib_inputs[0]) // task.batch_size)
        kept: set[str] = set()
        nbytes = 0
        for m in sorted(uses, key=lambda m: seconds[m] * uses[m] / max(size[m], 1), reverse=True):
            if nbytes + size[m] * batches <= BUDGET_BYTES:
                kept.add(m)
                nbytes += size[m] * batches
        skip = {k: [m for m in v if m in kept] for k, v in skip.items()}
        skip = {k: v for k, v in skip.items() if v}
        return cls(task.module, skip, nbytes) if skip else None

    def record(self, task: QuantTask, config: Mapping[str, LayerFormat]) -> torch.Tensor:
        """The fully quantized forward over the calibration set (its outputs are returned),
        keeping what the replays need. The plan came from one batch; a module replayed for a
        layer must also, in every batch, be called once and finish before the layer's first
        call (data-dependent control flow could differ), else that pairing is dropped."""
        mods = dict(self.module.named_modules())
        names = {id(m): n for n, m in mods.items()}
        watched = set(self.skip) | set(self.records)
        tick, batch = 0, -1
        first: dict[tuple[int, str], int] = {}  # (batch, layer) -> first call
        ends: dict[tuple[int, str], list[int]] = {}  # (batch, module) -> each call's end

        def new_batch(mod: nn.Module, args: Any) -> None:
            nonlocal batch
            batch += 1

        def pre(mod: nn.Module, args: Any) -> None:
            nonlocal tick
            first.setdefault((batch, names[id(mod)]), tick)
            tick += 1

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            nonlocal tick
            name = names[id(mod)]
            ends.setdefault((batch, name), []).append(tick)
            tick += 1
            if name in self.records:
                self.records[name].append(_clone(out))

        hooks = [self.module.register_forward_pre_hook(new_batch)]
        hooks += [mods[n].register_forward_pre_hook(pre) for n in watched]
        hooks += [mods[n].register_forward_hook(post) for n in watched]
        try:
            with simulate(task.layers, config):
                outs = task.forward(task.calib_inputs)
        finally:
            for h in hooks:
                h.remove()
        for layer, ms in self.skip.items():
            self.skip[layer] = [m for m in ms if all(
                len(ends.get((b, m), [])) == 1
                and ends[(b, m)][0] < first.get((b, layer), ends[(b, m)][0] + 1)
                for b in range(batch + 1))]
        self.skip = {k: v for k, v in self.skip.items() if v}
        used = {m for ms in self.skip.values() for m in ms}
        self.records = {m: r for m, r in self.records.items() if m in used}
        return outs

    @contextmanager
    def replaying(self, layer: str) -> Iterator[None]:
        """Within the block, the modules that finished before ``layer`` return their records
        (one per calibration batch, in order) without computing."""
        mods = dict(self.module.named_modules())
        patched = []
        for name in self.skip.get(layer, []):
            mod = mods[name]

            def replay(*args: Any, _it: Iterator[Any] = iter(self.records[name]),
                       _name: str = name, **kwargs: Any) -> Any:
                rec = next(_it, _END)
                if rec is _END:
                    raise RuntimeError(f"prefix replay: {_name} was called more often than "
                                       "in the recorded forward")
                return _clone(rec)

            mod.forward = replay  # type: ignore[method-assign]
            patched.append(mod)
        try:
            yield
        finally:
            for mod in patched:
                del mod.forward
