"""What every benchmark script shares: quiet exporter logs, the results file, layer counts.

Imported as ``_common`` (the script's own folder is on ``sys.path`` when it runs)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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
