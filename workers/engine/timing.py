"""Wall-clock measurement shared by every job that reports a latency: warm-up, repeats, median
and p90, with device synchronization, and peak memory (in a window of its own: its CPU sampler
must not run beside timed runs)."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from app.schemas import LatencyStats


def p90(samples: list[float]) -> float:
    """The nearest-rank 90th percentile: a time that was measured, never one past the slowest."""
    s = sorted(samples)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


@dataclass
class Timing:
    samples_ms: list[float]
    warmup: int

    def stats(self) -> LatencyStats:
        s = sorted(self.samples_ms)
        return LatencyStats(
            median_ms=statistics.median(s), p90_ms=p90(s),
            mean_ms=statistics.fmean(s), min_ms=s[0], repeats=len(s), warmup=self.warmup,
        )


def measure(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    min_time_s: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then at least ``repeats`` timed calls and at least
    ``min_time_s`` seconds of them. ``on_step(done, elapsed_s)`` runs between calls (progress,
    cancellation) and is not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
        if on_step is not None:
            on_step(len(samples), time.perf_counter() - start)
    return Timing(samples, warmup)


class PeakMemory:
    """Peak memory while the block runs. CUDA: the allocator's peak. CPU: the process's resident
    set size sampled every millisecond on a thread, minus its value at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return ("torch.cuda.max_memory_allocated above the loaded model, "
                    "first inference and warm-up runs")
        return ("peak process RSS above the loaded model, first inference and warm-up runs, "
                "sampled every 1 ms")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            proc = psutil.Process()
            self._base = proc.memory_info().rss
            self._max = self._base

            def sample() -> None:
                while not self._stop.wait(0.001):
                    self._max = max(self._max, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = int(max(0, self._max - self._base))
