"""The ``few_step_distill`` job: the digits teacher, SLAM and CD students, the quality table.

Every row is measured on the same conditioning labels (``samples_per_class`` of each digit)
and the same noise seed: Frechet distance in digits-cnn features against digits test, the
classifier's accuracy on the labels, wall time per sample. The teacher is sampled with DDIM at
``teacher_steps`` (the reference) and at each student step count (what few steps give without
distillation). Artifacts: a PNG grid per row, each student's weights and config.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save as save_st_bytes

from app.schemas import (
    FewStepDistillResult,
    FewStepDistillSpec,
    LoraNorm,
    QualityRow,
    StudentInfo,
)
from workers.engine import env, zoo
from workers.engine.context import JobContext
from workers.engine.diffusion import quality
from workers.engine.diffusion.distill import DistillConfig, distill, sample
from workers.engine.diffusion.nets import Denoiser, LoRALinear
from workers.engine.diffusion.schedule import solve
from workers.engine.diffusion.teacher import TEACHER_TRAIN, digits_flat, teacher

GRID_PER_CLASS = 8


def timed(device: torch.device, fn: Callable[..., torch.Tensor], *args: Any
          ) -> tuple[torch.Tensor, float]:
    """``fn(*args)`` and its wall time in seconds. CUDA runs kernels asynchronously, so the
    clock is read only once the device has finished (else it times the kernel launches alone)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def lora_norms(model: Denoiser) -> list[LoraNorm]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            upd = m.delta().detach()
            out.append(LoraNorm(layer=name, input_max=m.input_max,
                                weight_max=float(m.base.weight.detach().abs().max()),
                                a_max=float(m.A.detach().abs().max()), b_max=float(m.B.detach().abs().max()),
                                update_fro=float(upd.norm())))
    return out


def run(spec: FewStepDistillSpec, ctx: JobContext) -> FewStepDistillResult:
    t_start = time.perf_counter()
    device = env.resolve_device(spec.device)
    ctx.progress("teacher", 0.01, "loading (or training) the digits diffusion teacher")

    def teacher_check(step: int) -> None:
        if step % 200 == 0:
            ctx.progress("teacher", 0.01 + 0.2 * step / TEACHER_TRAIN["steps"],
                         f"training the teacher: step {step}")

    net, meta = teacher(ctx.store, teacher_check, device)
    cnn, _ = zoo.digits_cnn(ctx.store)
    cnn = cnn.to(device)
    x_train, y_train = (t.to(device) for t in digits_flat("train"))
    x_test = digits_flat("test")[0].to(device)
    real_feats = quality.features(cnn, quality.to_images(x_test))
    labels = torch.arange(10, device=device).repeat_interleave(spec.samples_per_class)
    dim = x_train.shape[1]
    rows: list[QualityRow] = []

    def measure(method: str, steps: int, gen: torch.Tensor, seconds: float) -> None:
        images = quality.to_images(gen)
        rows.append(QualityRow(
            method=method, steps=steps,  # type: ignore[arg-type]
            frechet_distance=quality.frechet(quality.features(cnn, images), real_feats),
            class_accuracy=quality.class_accuracy(cnn, images, labels),
            ms_per_sample=1000 * seconds / len(labels)))
        per_class = min(GRID_PER_CLASS, spec.samples_per_class)  # fewer where fewer were drawn
        pick = torch.cat([torch.arange(per_class) + c * spec.samples_per_class for c in range(10)])
        ctx.save_artifact(f"samples-{method}-{steps}.png", quality.png(images[pick], rows=10),
                          "image/png")

    # real data: the floor of the metric (train digits against test digits), drawn as the
    # samples are, `samples_per_class` of each digit (fewer where train holds fewer): the
    # first n train digits are not balanced, and that alone raises the distance
    real = quality.balanced(y_train, spec.samples_per_class)
    real_images = quality.to_images(x_train[real])
    rows.append(QualityRow(
        method="real", steps=None,
        frechet_distance=quality.frechet(quality.features(cnn, real_images), real_feats),
        class_accuracy=quality.class_accuracy(cnn, real_images, y_train[real]),
        ms_per_sample=None))

    def teacher_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = net(x, t, y)
        return out

    def labelled_teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return teacher_fn(x, t, labels)

    ctx.progress("teacher", 0.22, f"sampling the teacher at {spec.teacher_steps} steps")
    for steps in sorted({spec.teacher_steps, *spec.steps}, reverse=True):
        noise = torch.randn(len(labels), dim,
                            generator=torch.Generator().manual_seed(spec.seed)).to(device)
        gen, seconds = timed(device, solve, labelled_teacher, noise, steps)
        measure("teacher", steps, gen, seconds)

    students: list[StudentInfo] = []
    for k, method in enumerate(spec.methods):
        base = 0.3 + 0.6 * k / len(spec.methods)
        span = 0.6 / len(spec.methods)

        def check(it: int, base: float = base, span: float = span, method: str = method) -> None:
            if it % 100 == 0:
                ctx.progress(f"distill-{method}", base + span * it / spec.iterations,
                             f"{method}: iteration {it} of {spec.iterations}")

        cfg = DistillConfig(method=method, iterations=spec.iterations, lr=learning_rate(spec),
                            grid_points=spec.grid_points,
                            skip=spec.skip, teacher_substeps=spec.teacher_substeps,
                            student=spec.student, rank=spec.rank, seed=spec.seed)
        student, info = distill(copy.deepcopy(net), teacher_fn, x_train, y_train, cfg, check)
        ctx.log.info("%s student: %d iterations in %.1f s, final loss %.4g", method,
                     spec.iterations, info["seconds"], info["final_loss"])
        for steps in spec.steps:
            gen, seconds = timed(device, sample, student, labels, steps, dim, spec.seed)
            measure(method, steps, gen, seconds)
        students.append(StudentInfo(method=method, seconds=info["seconds"],
                                    final_loss=info["final_loss"],
                                    trainable_parameters=int(info["trainable_parameters"]),
                                    lora=lora_norms(student)))
        ctx.save_artifact(f"student-{method}.safetensors", save_st_bytes(
            {n: p.detach().cpu().contiguous() for n, p in student.state_dict().items()}),
            "application/octet-stream")
        ctx.save_artifact(f"student-{method}.json", json.dumps(
            {**student.config, "method": method, "student": spec.student, "rank": spec.rank,
             "sampling": "consistency, t_j = 1 - j / steps"}).encode(), "application/json")

    result = FewStepDistillResult(
        rows=rows, students=students, teacher_parameters=sum(p.numel() for p in net.parameters()),
        teacher_train_seconds=meta.get("train_seconds"),
        reference=f"digits test ({len(x_test)} images), features: digits-cnn fc2 (128-d)",
        summary=summarize(rows, spec), seconds=time.perf_counter() - t_start,
        method=(f"teacher: class-conditional residual MLP, v-loss, {meta['train']['steps']} steps "
                f"on digits train; students: copies of it ({spec.student}"
                f"{f', rank {spec.rank}' if spec.student == 'lora' else ''}), {spec.iterations} "
                f"iterations, batch 256, Adam lr {learning_rate(spec):g}, EMA target 0.95, "
                f"grid N={spec.grid_points}, "
                f"skip {spec.skip} (s clamped at the grid's end), teacher {spec.teacher_substeps} "
                f"DDIM steps per hop, MSE on x0; "
                f"SLAM as the official SPLAM code: gamma ~ U[0, 1), x0 read at the sub-path "
                f"point's noise level (v form), target and sampling at gamma = 1; "
                f"{spec.samples_per_class} samples per class, noise seed "
                f"{spec.seed}"),
        environment=env.environment(device))
    ctx.save_artifact("report.json", result.model_dump_json(indent=1).encode(), "application/json")
    ctx.progress("done", 1.0, result.summary[:200])
    return result


def learning_rate(spec: FewStepDistillSpec) -> float:
    return spec.lr if spec.lr is not None else (1e-3 if spec.student == "lora" else 2e-4)


def summarize(rows: list[QualityRow], spec: FewStepDistillSpec) -> str:
    by = {(r.method, r.steps): r for r in rows}
    ref = by[("teacher", spec.teacher_steps)]
    parts = [f"teacher {spec.teacher_steps} steps FD {ref.frechet_distance:.2f}"]
    for steps in spec.steps:
        cells = [f"{m} {by[(m, steps)].frechet_distance:.2f}" for m in spec.methods]
        parts.append(f"{steps} steps: " + ", ".join(cells)
                     + f", teacher DDIM {by[('teacher', steps)].frechet_distance:.2f}")
    return "; ".join(parts)
