"""Few-step distillation on digits, one run: the teacher at many and at few DDIM steps against
SLAM and consistency distillation (CD) students at 1 / 2 / 4 steps, full and LoRA students.

    python benchmarks/few_step_distill.py [--iterations 2000] [--students full,lora] [--out FILE.md]

Quality: Frechet distance in digits-cnn's 128-d features against digits test (lower is better;
the "real" row, digits train against digits test, is the floor) and digits-cnn's accuracy on
the conditioning labels.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import name_list, parser, positive_int, versions, write_out

from app.schemas import FewStepDistillResult, FewStepDistillSpec
from workers.engine import env
from workers.engine.context import LocalContext
from workers.engine.diffusion import job


def table(results: dict[str, FewStepDistillResult]) -> list[str]:
    lines = ["| student | method | steps | Frechet distance | class accuracy | ms / sample |",
             "| --- | --- | --- | --- | --- | --- |"]
    seen: set[tuple[str, int | None]] = set()
    for student, res in results.items():
        for r in res.rows:
            shared = r.method in ("real", "teacher")
            if shared and (r.method, r.steps) in seen:
                continue  # the same teacher rows in every job
            seen.add((r.method, r.steps))
            ms = "" if r.ms_per_sample is None else f"{r.ms_per_sample:.3f}"
            lines.append(f"| {'-' if shared else student} | {r.method} | "
                         f"{'' if r.steps is None else r.steps} | {r.frechet_distance:.2f} | "
                         f"{r.class_accuracy:.3f} | {ms} |")
    return lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--iterations", type=positive_int, default=2000)
    ap.add_argument("--students", default="full,lora", type=name_list(("full", "lora")),
                    help="which jobs to run, comma-separated: full, lora or full,lora")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, FewStepDistillResult] = {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for student in args.students:
            spec = FewStepDistillSpec(student=student, iterations=args.iterations)  # type: ignore[arg-type]
            results[student] = job.run(spec, LocalContext(Path(tmp) / student))
            print(f"{student}: {results[student].seconds:.0f} s", file=sys.stderr)
    e = env.environment(torch.device("cpu"))
    first = next(iter(results.values()))
    lines = [f"# Few-step distillation on digits ({e.device_name}, {e.threads} threads, "
             f"{dt.date.today().isoformat()})", "",
             f"`python benchmarks/few_step_distill.py --iterations {args.iterations} --students "
             f"{','.join(args.students)}` (job defaults, {args.iterations} iterations per "
             f"student); {versions('torch')}. {first.method}. Reference: {first.reference}. "
             f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
             "at the end (other processes shared the cores: timings are upper bounds).", ""]
    lines += table(results)
    lines += ["", "| student | method | trainable parameters | distillation seconds | final loss |",
              "| --- | --- | --- | --- | --- |"]
    for student, res in results.items():
        lines += [f"| {student} | {s.method} | {s.trainable_parameters:,} | {s.seconds:.0f} | "
                  f"{s.final_loss:.3g} |" for s in res.students]
    first_lora = results["lora"].students[0] if "lora" in results else None
    lora = first_lora.lora if first_lora else []
    if lora:
        lines += ["", f"LoRA norms ({first_lora and first_lora.method.upper()} student; the "
                  "quantities the LoRA-limits paper bounds):", "",
                  "| layer | max input | max W | max A | max B | ||(alpha/r) B A||_F |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {n.layer} | {n.input_max:.2f} | {n.weight_max:.3f} | {n.a_max:.3f} | "
                  f"{n.b_max:.4f} | {n.update_fro:.4f} |" for n in lora]
    lines += ["", f"Teacher: {first.teacher_parameters:,} parameters, trained in "
              f"{first.teacher_train_seconds} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(args.out, text)


if __name__ == "__main__":
    main()
