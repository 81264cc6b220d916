"""What every benchmark script shares: quiet exporter logs, the results file, layer counts,
argument types that fail at parse time with a clear message, the versions line.

Imported as ``_common`` (the script's own folder is on ``sys.path`` when it runs)."""

from __future__ import annotations

import argparse
import logging
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path


def quiet_logs() -> None:
    """Warnings only; the ONNX exporter and ONNX Runtime are chatty at INFO/WARNING."""
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("onnxruntime", "root", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def write_out(path: Path | None, lines: Iterable[str] | str) -> None:
    """Write the printed table to ``--out`` (when given), creating its folder."""
    if path is None:
        return
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def layer_counts(config: Mapping[str, str]) -> str:
    """'3 int4, 2 int8' for a per-layer precision config; 'none' when nothing is quantized."""
    counts: dict[str, int] = {}
    for prec in config.values():
        counts[prec] = counts.get(prec, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the script's docstring as written (usage lines
    and lists kept), not re-wrapped into one paragraph."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of runs, steps, workers ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (a duration)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 0, e.g. ``0,1,2``; checked before any work
    starts (not after the first hour of it)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative value")
    return values


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers, e.g. ``0.9,0.5,0.1``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None


def name_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names, each one of ``choices``."""
    known = list(choices)

    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
        return names
    return parse


def versions(*packages: str) -> str:
    """'Python 3.11.7, torch 2.13.0+cpu, ...' for the environment line of a table."""
    from importlib.metadata import PackageNotFoundError, version

    out = [f"Python {platform.python_version()}"]
    for pkg in packages:
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} not installed")
    return ", ".join(out)
