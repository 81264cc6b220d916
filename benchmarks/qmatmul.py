"""Weight-only quantized matmul: our Triton kernel (``gpu_kernels.qmatmul``) vs PyTorch's own
weight-only kernels vs dense fp32 / bf16 GEMMs, one table from one run.

Decides which kernel the ``torch-cuda`` backend's int8-weight / int4 layers should call (issue:
use a maintained library kernel where it is as fast). Rows per shape (M tokens, K in, N out):
time (median of CUDA-event-free wall time with synchronization, after warm-up), ratio to the
bf16 GEMM, and the max error against the dequantized fp32 reference. On a CPU the Triton rows
are left out (the interpreter is for correctness, not speed).

    python benchmarks/qmatmul.py [--shapes 1x4096x4096,16x4096x4096,256x4096x4096,2048x4096x4096]
        [--group 128] [--repeats 20] [--out F.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import parser, positive_int, versions, write_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_kernels.qmatmul import dequantize, qmatmul, quantize_weight, unpack_int4  # noqa: E402
from workers.engine import env, timing  # noqa: E402


def _candidates(x: torch.Tensor, w: torch.Tensor, group: int
                ) -> dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor | None]]:
    """name -> (call, the fp32 product it should equal, or None for the dense rows)."""
    cuda = x.is_cuda
    xb = x.bfloat16()
    wb = w.bfloat16()
    q8, s8, _ = quantize_weight(w.cpu(), 8)
    q4, s4, _ = quantize_weight(w.cpu(), 4, group)
    q8, s8, q4, s4 = (t.to(x.device) for t in (q8, s8, q4, s4))
    ref8 = x @ dequantize(q8, s8, None, 8).T
    ref4 = x @ dequantize(q4, s4, None, 4, group).T
    out: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor | None]] = {
        "fp32 GEMM": (lambda: x @ w.T, None),
        "bf16 GEMM": (lambda: xb @ wb.T, None),
    }
    if cuda:
        out["ours int8 (Triton, fp32 x)"] = (
            lambda: qmatmul(x, q8, s8, None, 8, impl="triton"), ref8)
        out["ours int8 (Triton, bf16 x)"] = (
            lambda: qmatmul(xb, q8, s8, None, 8, impl="triton"), ref8)
        out[f"ours int4 g{group} (Triton, bf16 x)"] = (
            lambda: qmatmul(xb, q4, s4, None, 4, group, impl="triton"), ref4)
    s8b = s8.bfloat16()
    out["torch._weight_int8pack_mm (bf16 x)"] = (
        lambda: torch._weight_int8pack_mm(xb, q8, s8b), ref8)
    # int4: tinygemm's layout, w = (q - 8) * scale + zero with zero = 0 (symmetric).
    sz = torch.stack([s4, torch.zeros_like(s4)], -1).transpose(0, 1).contiguous().bfloat16()
    q4i = unpack_int4(q4).to(torch.int32)
    if cuda:
        packed = torch._convert_weight_to_int4pack(
            (q4i[:, ::2] << 4 | q4i[:, 1::2]).to(torch.uint8), 8)
        out[f"torch._weight_int4pack_mm g{group} (bf16 x)"] = (
            lambda: torch._weight_int4pack_mm(xb, packed, group, sz), ref4)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q4i, 1)
        out[f"torch._weight_int4pack_mm_for_cpu g{group} (bf16 x)"] = (
            lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, group, sz), ref4)
    return out


def shapes(text: str) -> list[tuple[int, int, int]]:
    """argparse type: ``MxKxN,...``, each a positive integer."""
    out = []
    for shape in text.split(","):
        try:
            m, k, n = (int(v) for v in shape.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{shape!r} is not MxKxN (e.g. 16x4096x4096)") from None
        if min(m, k, n) < 1:
            raise argparse.ArgumentTypeError(f"{shape!r}: M, K and N must be >= 1")
        out.append((m, k, n))
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shapes", default="1x4096x4096,16x4096x4096,256x4096x4096,2048x4096x4096",
                    type=shapes, help="MxKxN, comma-separated")
    ap.add_argument("--group", type=positive_int, default=128,
                    help="int4 group size (K must be a multiple of it)")
    ap.add_argument("--repeats", type=positive_int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    odd = [f"{m}x{k}x{n}" for m, k, n in args.shapes if k % args.group or args.group % 2]
    if odd:
        ap.error(f"argument --group: {args.group} must be even and divide K of {', '.join(odd)}")
    shape_text = ",".join(f"{m}x{k}x{n}" for m, k, n in args.shapes)
    allocator = env.tune_allocator()  # as the workers run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"# Weight-only quantized matmul — {env.device_name(device)}, "
             f"{dt.date.today().isoformat()}", "",
             f"Command: `python benchmarks/qmatmul.py --shapes {shape_text} --group {args.group} "
             f"--repeats {args.repeats}`; "
             f"{versions('torch', *(['triton'] if device.type == 'cuda' else []))}"
             + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
             + f"; median of {args.repeats} synchronized runs after 3 "
             "warm-ups; error = max |out - x @ dequantized(W).T| / max |x @ dequantized(W).T|; "
             f"allocator: {allocator}.",
             "", "| M x K x N | kernel | ms | vs bf16 GEMM | rel. error |",
             "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for m, k, n in args.shapes:
        shape = f"{m}x{k}x{n}"
        x = torch.randn(m, k, generator=gen).to(device)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(device)
        rows: list[tuple[str, float, float | None]] = []
        for name, (fn, ref) in _candidates(x, w, args.group).items():
            try:
                ms = timing.measure(fn, warmup=3, repeats=args.repeats, device=device
                                    ).stats().median_ms
                err = (None if ref is None else
                       float((fn().float() - ref).abs().max() / ref.abs().max()))
            except (RuntimeError, NotImplementedError) as exc:  # a kernel this build lacks
                print(f"{shape} {name}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            rows.append((name, ms, err))
        bf16 = next((ms for name, ms, _ in rows if name == "bf16 GEMM"), None)
        for name, ms, err in rows:
            line = (f"| {shape} | {name} | {ms:.4f} | "
                    f"{'-' if bf16 is None else f'{ms / bf16:.2f}x'} | "
                    f"{'-' if err is None else f'{err:.1e}'} |")
            lines.append(line)
            print(line, flush=True)
    write_out(args.out, lines)


if __name__ == "__main__":
    main()
