"""Load on the service with real processes: an embedded redis-server, the API (uvicorn) and one
Celery worker, driven from this process over loopback by concurrent clients that submit jobs,
poll job status and follow SSE event streams at once. Bounded in count and time.

    python benchmarks/load.py [--jobs 40] [--pollers 8] [--streams 4] [--duration 20] [--out F]

Every simulated user has their own API key (tenant); the per-key rate limit is off for the run
(it would cap each poller at 10 requests/s). Reports requests/s and p50 / p99 latency per
request type, then waits for every accepted job and checks that each reached a final state
exactly once (one run, one attempt).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from _common import parser, positive_float, positive_int, versions, write_out

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.auth import create_key
from app.schemas import BenchmarkSpec, Job, ModelRef
from modelpress import _stack

# A job that does real work on the worker but is short: a digits-cnn benchmark, few repeats.
SPEC = BenchmarkSpec(model=ModelRef(zoo="digits-cnn"), warmup=1, repeats=5, per_layer=False)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # first start, last end

    def add(self, what: str, seconds: float, ok: bool) -> None:
        self.latencies.setdefault(what, []).append(seconds)
        end = time.perf_counter()
        first, _ = self.spans.get(what, (end - seconds, end))
        self.spans[what] = (min(first, end - seconds), end)
        if not ok:
            self.errors[what] = self.errors.get(what, 0) + 1

    def rate(self, what: str) -> float:
        """Requests per second while requests of this type were being made."""
        first, last = self.spans[what]
        return len(self.latencies[what]) / max(last - first, 1e-9)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank: the smallest value with at least ``q`` of the values
    at or below it (p99 of 100 values is the 99th, not the largest)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# Accepted jobs as (index of the owner's client, job id): a job is visible to its tenant only,
# so every status read and stream is made with the owner's key.
Owned = list[tuple[int, str]]


async def submitter(clients: list[httpx.AsyncClient], i: int, n: int, ids: Owned,
                    stats: Stats) -> None:
    body = {"spec": SPEC.model_dump(mode="json")}
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            r = await clients[i].post("/v1/jobs", json=body)
        except httpx.HTTPError:
            stats.add("submit (POST /v1/jobs)", time.perf_counter() - t0, False)
            continue
        stats.add("submit (POST /v1/jobs)", time.perf_counter() - t0, r.status_code == 201)
        if r.status_code == 201:
            ids.append((i, r.json()["id"]))


async def poller(clients: list[httpx.AsyncClient], ids: Owned, stop: float, stats: Stats) -> None:
    while time.monotonic() < stop:
        if not ids:
            await asyncio.sleep(0.01)
            continue
        owner, jid = random.choice(ids)
        t0 = time.perf_counter()
        try:
            ok = (await clients[owner].get(f"/v1/jobs/{jid}")).status_code == 200
        except httpx.HTTPError:
            ok = False
        stats.add("status (GET /v1/jobs/{id})", time.perf_counter() - t0, ok)


async def streamer(clients: list[httpx.AsyncClient], ids: Owned, stop: float,
                   stats: Stats) -> None:
    while time.monotonic() < stop:
        if not ids:
            await asyncio.sleep(0.01)
            continue
        owner, jid = random.choice(ids)
        t0 = time.perf_counter()
        first: float | None = None
        events = 0
        ok = False
        try:
            async with clients[owner].stream(
                    "GET", f"/v1/jobs/{jid}/events",
                    timeout=httpx.Timeout(10.0, read=max(1.0, stop - time.monotonic()))) as r:
                ok = r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events += 1
                        if first is None:
                            first = time.perf_counter() - t0
        except httpx.ReadTimeout:  # the run ended while the job was still going: not an error
            pass
        except httpx.HTTPError:
            ok = False
        stats.add("SSE stream (first event)",
                  first if first is not None else time.perf_counter() - t0, ok and events > 0)
        stats.latencies.setdefault("SSE events received", []).append(float(events))


async def drive(base: str, keys: list[str], args: argparse.Namespace
                ) -> tuple[Stats, Owned, float]:
    stats, ids = Stats(), []  # type: Stats, Owned
    clients = [httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {k}"},
                                 timeout=30.0) for k in keys]
    t0 = time.monotonic()
    stop = t0 + args.duration
    per = -(-args.jobs // args.submitters)
    tasks = [submitter(clients, i, min(per, args.jobs - i * per), ids, stats)
             for i in range(args.submitters) if args.jobs - i * per > 0]
    tasks += [poller(clients, ids, stop, stats) for _ in range(args.pollers)]
    tasks += [streamer(clients, ids, stop, stats) for _ in range(args.streams)]
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    for c in clients:
        await c.aclose()
    return stats, ids, elapsed


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--jobs", type=positive_int, default=40, help="jobs submitted in all")
    ap.add_argument("--submitters", type=positive_int, default=4)
    ap.add_argument("--pollers", type=positive_int, default=8)
    ap.add_argument("--streams", type=positive_int, default=4)
    ap.add_argument("--duration", type=positive_float, default=20.0, help="load phase, seconds")
    ap.add_argument("--finish-timeout", type=positive_float, default=600.0,
                    help="seconds to wait, after the load phase, for every job to end")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        red = _stack.EmbeddedRedis(root / "redis").start()
        port = _stack.free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"MODELPRESS_REDIS_URL": red.url, "MODELPRESS_DATA_DIR": str(root / "data"),
               "MODELPRESS_RATE_LIMIT_PER_MINUTE": "0"}
        worker = _stack.spawn_worker(env, root / "worker.log", ["cpu"], "load")
        api = _stack.spawn_api(env, root / "api.log", "127.0.0.1", port)
        try:
            _stack.wait_ready(base, 120.0, {"worker": worker, "api": api},
                              {"worker": root / "worker.log", "api": root / "api.log"})
            r = redis.Redis.from_url(red.url)
            users = max(args.submitters, args.pollers, args.streams)
            keys = [create_key(r, f"load-{i}", "load") for i in range(users)]
            stats, ids, elapsed = asyncio.run(drive(base, keys, args))
            # every accepted job must end, each exactly once
            load_end = time.monotonic()
            deadline = load_end + args.finish_timeout
            final: dict[str, Job] = {}
            while time.monotonic() < deadline and len(final) < len(ids):
                for owner, jid in ids:
                    if jid in final:
                        continue
                    headers = {"Authorization": f"Bearer {keys[owner]}"}
                    job = Job.model_validate(
                        httpx.get(f"{base}/v1/jobs/{jid}", headers=headers).json())
                    if job.done:
                        final[jid] = job
                time.sleep(0.5)
            drain = time.monotonic() - load_end
        finally:
            _stack.stop_process(api)
            _stack.stop_process(worker)
            red.stop()
    import torch

    from workers.engine.env import environment

    cpu = environment(torch.device("cpu")).device_name
    lines = [f"# Load on one API process and one worker ({cpu}, "
             f"{dt.date.today().isoformat()})", "",
             f"`python benchmarks/load.py --jobs {args.jobs} --submitters {args.submitters} "
             f"--pollers {args.pollers} --streams {args.streams} --duration {args.duration:g} "
             f"--finish-timeout {args.finish_timeout:g}` (loopback; embedded redis-server, "
             "uvicorn, one Celery worker; one key per simulated user, rate limit off); "
             f"{versions('uvicorn', 'celery', 'redis', 'httpx')}. Load phase {elapsed:.1f} s.", "",
             f"The load generator shares the machine ({os.cpu_count()} cores) with Redis, the API "
             "and the worker. p50 = median, p99 = nearest rank. "
             "req/s: while that request type was being made (streams are long-lived: each follows "
             "one job until it ends or the run does).", "",
             "| request | count | errors | req/s | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for what, lat in stats.latencies.items():
        if what == "SSE events received":
            continue
        lines.append(f"| {what} | {len(lat)} | {stats.errors.get(what, 0)} | "
                     f"{'-' if what.startswith('SSE') else f'{stats.rate(what):.1f}'} | "
                     f"{1e3 * statistics.median(lat):.1f} | "
                     f"{1e3 * pct(lat, 0.99):.1f} |")
    ev = stats.latencies.get("SSE events received", [])
    succeeded = sum(j.state == "succeeded" for j in final.values())
    once = sum(j.attempts == 1 and len(j.runs) == 1 for j in final.values())
    lines += ["", f"Jobs: {len(ids)} accepted of {args.jobs} submitted; {len(final)} reached a "
              f"final state ({succeeded} succeeded) within {drain:.0f} s of the load phase; "
              f"{once} ran exactly once (one attempt, one run); lost: {len(ids) - len(final)}. "
              f"SSE streams received {int(sum(ev))} events in total."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_out(args.out, text)
    if len(final) != len(ids) or once != len(ids):
        sys.exit(1)


if __name__ == "__main__":
    main()
