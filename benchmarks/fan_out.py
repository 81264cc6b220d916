"""Scale-out of one mixed-precision job: the same job on one worker, then on several, each
worker a real Celery process with its own torch threads, against an embedded redis-server and
the API. The job offers its inter-layer terms and baseline searches to idle workers
(``fan_out``); the table shows where the time went and who computed what.

    python benchmarks/fan_out.py [--model minilm-l6] [--workers 2] [--threads 1] [--out F]

Give each worker cores of its own (workers x threads <= cores): on a shared core the pieces
would only take turns. The frontier is timed by the job's own worker after every piece it needs
has finished, so the chosen configurations are comparable.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from _common import layer_counts, parser, positive_int, versions, write_out

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import records
from app.auth import create_key
from app.schemas import Job, MixedPrecisionResult, MixedPrecisionSpec
from modelpress import Client, _stack


def run_job(root: Path, red: _stack.EmbeddedRedis, db: int, workers: int,
            spec: MixedPrecisionSpec) -> tuple[Job, float, dict[str, int]]:
    """The finished job, its wall time, and how many frontier re-measurements each worker
    made (the ``mpd:`` values in the job's memo name their worker)."""
    env = {"MODELPRESS_REDIS_URL": f"redis://127.0.0.1:{red.port}/{db}",
           "MODELPRESS_DATA_DIR": str(root / "data"), "MODELPRESS_RATE_LIMIT_PER_MINUTE": "0"}
    port = _stack.free_port()
    base = f"http://127.0.0.1:{port}"
    logs = {f"w{i}": root / f"run{db}-w{i}.log" for i in range(1, workers + 1)}
    procs = {name: _stack.spawn_worker(env, log, ["cpu"], name) for name, log in logs.items()}
    logs["api"] = root / f"run{db}-api.log"
    procs["api"] = _stack.spawn_api(env, logs["api"], "127.0.0.1", port)
    try:
        _stack.wait_ready(base, 180.0, procs, logs)
        time.sleep(5)  # every worker's pool process has imported the engine
        r = redis.Redis.from_url(env["MODELPRESS_REDIS_URL"], decode_responses=True)
        key = create_key(r, "bench", "fan-out")
        with Client(base, key) as client:
            t0 = time.monotonic()
            job = client.jobs.create(spec)
            done = client.jobs.wait(job.id, timeout=3600)
            wall = time.monotonic() - t0
        remeasured = Counter(str(json.loads(v)["by"]).split("@")[0]
                             for k, v in r.hgetall(records.memo_key(job.id)).items()
                             if k.startswith("mpd:"))
        return done, wall, dict(remeasured)
    finally:
        for proc in procs.values():
            _stack.stop_process(proc)


def warm_zoo(data_dir: Path, spec: MixedPrecisionSpec) -> None:
    """Zoo models that train on first use are trained into the store before anything is timed."""
    from app.config import Settings
    from app.storage import open_store
    from workers.engine import models
    from workers.engine.context import LocalContext

    store = open_store(Settings(data_dir=data_dir))
    models.load_model(spec.model, LocalContext(data_dir / "warm", store=store))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="minilm-l6", help="a zoo model")
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    spec = MixedPrecisionSpec.model_validate({"model": {"zoo": args.model},
                                              "threads": args.threads})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm_zoo(root / "data", spec)
        red = _stack.EmbeddedRedis(root / "redis").start()
        try:
            for db, n in enumerate(sorted({1, args.workers}), start=1):
                done, wall, remeasured = run_job(root, red, db, n, spec)
                res = done.result
                if not isinstance(res, MixedPrecisionResult):
                    sys.exit(f"the job on {n} worker(s) did not succeed: {done.error}")
                rows.append((n, wall, res, remeasured))
                print(f"{n} worker(s): {wall:.1f} s", flush=True)
        finally:
            red.stop()
    import torch

    from workers.engine.env import environment

    cpu = environment(torch.device("cpu")).device_name
    stages = list(rows[0][2].stage_seconds)
    counts = " and ".join(str(n) for n, *_ in rows) + (" workers" if len(rows) > 1 else " worker")
    lines = [f"# One mixed-precision job on {counts} ({cpu}, "
             f"{os.cpu_count()} cores, {dt.date.today().isoformat()})", "",
             f"`python benchmarks/fan_out.py --model {args.model} --workers {args.workers} "
             f"--threads {args.threads}`: the API's default spec for `{args.model}` with "
             f"`threads` {args.threads}; embedded redis-server, uvicorn, Celery workers with one "
             "job process each; wall time from submission to the final state. Evaluations by "
             "worker: the job runs on one of them, the others compute the pieces it offers. "
             "Frontier re-measured by: which worker re-measured each frontier candidate on ONNX "
             "Runtime (`mpd:` values in the job's memo). vs fp32: the chosen config's latency "
             "over the fp32 baseline's, both as the job measured them. "
             f"{versions('torch', 'onnxruntime', 'celery', 'redis')}.", "",
             "| workers | wall s | " + " | ".join(f"{s} s" for s in stages)
             + " | evaluations by worker | frontier re-measured by | chosen | metric | vs fp32 |",
             "| --- | --- | " + " | ".join("---" for _ in stages)
             + " | --- | --- | --- | --- | --- |"]
    for n, wall, res, remeasured in rows:
        by = ", ".join(f"{w.split('@')[0]} {c}" for w, c in sorted(res.computed_by.items()))
        lines.append(f"| {n} | {wall:.1f} | "
                     + " | ".join(f"{res.stage_seconds.get(s, 0.0):.1f}" for s in stages)
                     + f" | {by} | "
                     + ", ".join(f"{w} {c}" for w, c in sorted(remeasured.items()))
                     + f" | {layer_counts(res.chosen.config)} | "
                     f"{res.chosen.deployed_metric:.6f} | "
                     f"{(res.chosen.latency_ms or 0) / (res.baseline.latency_ms or 1):.3f}x |")
    if len(rows) == 2:
        lines += ["", f"{args.workers} workers took {rows[1][1] / rows[0][1]:.2f}x the wall time "
                  "of one."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(args.out, text)


if __name__ == "__main__":
    main()
