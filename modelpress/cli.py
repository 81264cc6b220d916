"""The ``modelpress`` command line: run the service, manage keys, submit and follow jobs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import redis
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from app.auth import TENANT_RE, create_key, hash_token
from app.config import Settings
from app.records import apikey_key
from app.schemas import (
    FINAL_STATES,
    WAITING_FOR_WORKER,
    Deleted,
    Job,
    MixedPrecisionSpec,
    ModelRef,
)
from modelpress import _base, _stack
from modelpress._client import Client
from modelpress._errors import ModelpressError

LOCAL_TENANT = "local"


class _DataDirOnly(BaseSettings):
    """The data folder, found as the server's Settings finds it (environment, then .env), and
    nothing else: a client command must not fail on a server setting it has no use for (say a
    visibility timeout below the task time limit, which Settings refuses)."""

    model_config = Settings.model_config
    data_dir: Path = Settings.model_fields["data_dir"].default


def _client(ctx: click.Context) -> Client:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    base_url, api_key = obj.get("base_url"), obj.get("api_key")
    if base_url is not None and api_key is not None:
        return Client(base_url=base_url, api_key=api_key)
    # What a local serve wrote, found in the data folder serve used (its key for it alone)
    data_dir = _DataDirOnly().data_dir
    if base_url is None and (data_dir / "url").exists():
        base_url = (data_dir / "url").read_text().strip()
    if api_key is None:
        api_key = _base.resolve_auth(None, base_url, data_dir)[1]
    return Client(base_url=base_url, api_key=api_key)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
@click.option("--base-url", envvar="MODELPRESS_BASE_URL", default=None,
              help="API address (default: what `modelpress serve` wrote, else localhost:8000).")
@click.option("--api-key", envvar="MODELPRESS_API_KEY", default=None, help="API key (bearer).")
@click.pass_context
def main(ctx: click.Context, base_url: str | None, api_key: str | None) -> None:
    """modelpress: model compression as a service."""
    ctx.ensure_object(dict).update(base_url=base_url, api_key=api_key)


# ---- running the service -------------------------------------------------------------------------

def _local_key(r: redis.Redis, key_file: Path) -> str:
    """Reuse the key saved by an earlier `serve` if Redis still knows it, else create one."""
    if key_file.exists():
        token = key_file.read_text().strip()
        if r.exists(apikey_key(hash_token(token))):
            return token
    token = create_key(r, LOCAL_TENANT, "local")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(token + "\n")
    key_file.chmod(0o600)
    return token


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def format_result(job: Job) -> str:
    """A few human lines for a finished job's result."""
    res = job.result
    if res is None:
        return f"job {job.id}: {job.state}" + (f" ({job.error.message})" if job.error else "")
    if res.kind == "loss_benchmark":
        return f"job {job.id} {job.state} — loss_benchmark\n{res.table}"
    if res.kind == "intrinsic_dimension":
        # None: the target was not reached (by more than half of the seeds, or by this seed);
        # then there is no artifact to rebuild either.
        per_seed = ", ".join("not reached" if d is None else str(d) for d in res.d_int90_per_seed)
        d_int90 = "not reached" if res.d_int90 is None else str(res.d_int90)
        if res.rebuilt_accuracy is None or res.compression_ratio is None:
            rebuilt = "no model rebuilt (the target was not reached)"
        else:
            rebuilt = (f"rebuilt from the artifact: accuracy {res.rebuilt_accuracy}, compression "
                       f"{round(res.compression_ratio)}x")
        return (f"job {job.id} {job.state} — intrinsic_dimension of {res.model} "
                f"({res.projection})\n  full accuracy {res.full_accuracy:.4f}, target "
                f"{res.target:.4f}\n  d_int90 {d_int90} of D {res.parameters:,} "
                f"(per seed [{per_seed}]), {res.training_runs} training runs\n  {rebuilt}")
    if res.kind == "few_step_distill":
        rows = [f"  {r.method:8} {r.steps if r.steps is not None else '-':>4} steps  FD "
                f"{r.frechet_distance:8.2f}  class accuracy {r.class_accuracy:.3f}"
                for r in res.rows]
        return f"job {job.id} {job.state} — few_step_distill\n" + "\n".join(rows)
    if res.kind == "spiking":
        return (f"job {job.id} {job.state} — spiking of {res.model}\n  {res.metric}: twin "
                f"{res.twin_quality:.4f}, spiking {res.spiking_quality:.4f} (gap "
                f"{res.quality_gap:+.4f})\n  per {res.per}: {res.twin_macs:,.0f} MACs vs "
                f"{res.spiking_acs:,.0f} ACs + {res.spiking_macs:,.0f} MACs ({res.op_ratio:.2f}x); "
                f"energy {res.energy_ratio:.1f}x lower ({res.energy_note})")
    lines = [f"job {job.id} {job.state} — {res.kind} of {res.model}"]
    if res.kind == "benchmark":
        env = res.environment
        lines += [
            f"  device        {env.device_name} ({env.device}, {env.threads} threads)",
            f"  batch         {res.batch_size} x {res.input_shapes}",
            f"  latency       median {res.latency.median_ms:.3f} ms, p90 {res.latency.p90_ms:.3f} ms "
            f"({res.latency.repeats} repeats after {res.latency.warmup} warm-up)",
            f"  throughput    {res.throughput_per_s:,.0f} samples/s",
            f"  peak memory   {res.peak_memory_bytes / 2**20:,.1f} MiB ({res.memory_method})",
            f"  parameters    {res.parameters:,} ({res.model_bytes / 2**20:,.2f} MiB)",
        ]
        for layer in sorted(res.per_layer, key=lambda x: -x.median_ms)[:5]:
            lines.append(f"    {layer.name:<24} {layer.type:<12} {layer.median_ms:8.4f} ms "
                         f"{layer.share:6.1%}")
    elif res.kind == "mixed_precision":
        b, c = res.baseline, res.chosen
        lines += [
            f"  budget        {res.budget.value:g} {res.budget.mode} on {res.metric} "
            f"(threshold {res.threshold:.6f}), backend {res.backend}",
            f"  fp32          {res.metric} {b.deployed_metric:.6f}, {b.latency_ms:.3f} ms, "
            f"{(b.size_bytes or 0) / 1e6:.2f} MB",
            f"  chosen        {res.metric} {c.deployed_metric:.6f}, {c.latency_ms:.3f} ms "
            f"({res.latency_reduction:.1%} faster), {(c.size_bytes or 0) / 1e6:.2f} MB",
            f"  config        {c.config or 'all fp32'}",
            f"  why           {res.why}",
            f"  frontier      {sum(p.pareto for p in res.frontier)} Pareto points of "
            f"{len(res.frontier)} measured; {res.evaluations} simulated evaluations",
        ]
        if res.lora is not None:
            lp, lr = res.lora.plain, res.lora.recovered
            lines.append(f"  lora          {len(lr.config)} layers quantized, {lr.latency_ms:.3f} ms "
                         f"with adapters vs {len(lp.config)}, {lp.latency_ms:.3f} ms without "
                         f"({res.lora.trainings} trainings)")
    elif res.kind == "sensitivity":
        for row in sorted(res.layers, key=lambda x: x.rank):
            lines.append(f"    {row.rank:>3} {row.name:<40} score {row.score:.4f}")
    return "\n".join(lines)


@main.command()
@click.option("--demo/--no-demo", default=False,
              help="Submit the main job through the SDK, show its progress and result.")
@click.option("--exit", "exit_after", is_flag=True,
              help="Stop the service after the demo instead of serving until Ctrl-C.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="API port (default MODELPRESS_API_PORT).")
def serve(demo: bool, exit_after: bool, port: int | None) -> None:
    """Run Redis (embedded unless REDIS_URL is set), one worker and the API on this machine."""
    settings = _settings()
    _check_store(settings)  # before starting anything: the worker and the API would refuse it
    import torch

    queues = settings.queues_for_worker(torch.cuda.is_available())
    if settings.default_queue not in queues:
        raise click.ClickException(
            f"the worker would consume {','.join(queues)} but jobs go to the default queue "
            f"`{settings.default_queue}`: set MODELPRESS_WORKER_QUEUES to include it (or "
            "MODELPRESS_DEFAULT_QUEUE to one of them)")
    data_dir = settings.data_dir.resolve()
    logs = data_dir / "logs"
    embedded: _stack.EmbeddedRedis | None = None
    procs: dict[str, Any] = {}
    url_written = False

    def stop_on_signal(*_: object) -> None:
        raise KeyboardInterrupt  # stopped as by Ctrl-C, and saying so

    # From the first process started on, SIGTERM and SIGHUP (a closed terminal) stop everything
    # as Ctrl-C does: their default action would end serve alone and leave its children (each
    # in a session of its own) running.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)

    def shutdown(*_: object) -> None:
        # a second Ctrl-C or SIGTERM must not cut the clean-up short and leave processes behind
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            # the address is dead from now: the SDK and CLI must not keep calling it
            if url_written:
                (data_dir / "url").unlink(missing_ok=True)
            _stack.stop_process(procs.get("api"))
            _stack.stop_worker(procs.get("worker"), settings.worker_stop_grace_s)
            if embedded is not None:
                (data_dir / "redis-url").unlink(missing_ok=True)
                embedded.stop()
        finally:  # as they were (serve may run inside another program: a test's CliRunner)
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    try:
        redis_url = settings.redis_url
        if redis_url is None:
            # assigned before it starts, so that an interrupted start is stopped too
            embedded = _stack.EmbeddedRedis(data_dir / "redis")
            embedded.start()
            redis_url = embedded.url
            # its port is new each start: written for `modelpress keys create`
            (data_dir / "redis-url").write_text(redis_url + "\n")
            click.echo(f"redis    embedded redis-server at {redis_url} (AOF in {data_dir / 'redis'})")
        else:
            click.echo(f"redis    {_redacted(redis_url)}")
        r = redis.Redis.from_url(redis_url)
        try:
            r.ping()
            key = _local_key(r, data_dir / "api-key")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            where = "the embedded redis-server" if embedded else "MODELPRESS_REDIS_URL"
            fix = ("see its log under " + str(data_dir / "redis") if embedded else
                   "start that Redis, correct the URL, or unset MODELPRESS_REDIS_URL (and "
                   "REDIS_URL) to have serve start an embedded one")
            raise click.ClickException(f"could not reach Redis at {_redacted(redis_url)} "
                                       f"({where}): {str(exc).rstrip('.')}; {fix}") from None

        host = settings.api_host
        api_port = port or settings.api_port
        if api_port == 0 or not _port_free(host, api_port):
            if api_port:
                click.echo(f"port {api_port} is taken; using a free one")
            api_port = _stack.free_port()
        base_url = f"http://{host}:{api_port}"
        env = {"MODELPRESS_REDIS_URL": redis_url, "MODELPRESS_DATA_DIR": str(data_dir),
               "MODELPRESS_API_HOST": host, "MODELPRESS_API_PORT": str(api_port)}
        procs["worker"] = _stack.spawn_worker(env, logs / "worker.log", queues, "local")
        procs["api"] = _stack.spawn_api(env, logs / "api.log", host, api_port)
        _stack.wait_ready(base_url, 120.0, procs,
                          {"worker": logs / "worker.log", "api": logs / "api.log"})
        (data_dir / "url").write_text(base_url + "\n")
        url_written = True
        public = settings.public_url or base_url
        click.echo(f"api      {public}   (OpenAPI docs: {public}/docs)")
        click.echo(f"dashboard {public}/")
        click.echo(f"worker   queues {','.join(queues)}; logs in {logs}")
        click.echo(f"api key  {key}   (tenant '{LOCAL_TENANT}', saved to {data_dir / 'api-key'})")

        if demo:
            _demo(base_url, key)
        if exit_after:
            return
        click.echo("serving; Ctrl-C stops everything")
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1.0)
        dead = [w for w, p in procs.items() if p.poll() is not None]
        raise click.ClickException(f"{', '.join(dead)} exited; see {logs}")
    except KeyboardInterrupt:
        click.echo(f"stopping (a running job gets up to {settings.worker_stop_grace_s:g} s, then "
                   "goes back to the queue for the next start)")
    except RuntimeError as exc:  # no redis-server to run, a process that died or never got ready
        raise click.ClickException(str(exc)) from None
    finally:
        shutdown()


def _redacted(url: str) -> str:
    """A Redis URL with its password (if any) masked, to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()


def _demo(base_url: str, key: str) -> None:
    # The main job: per-layer precisions for digits-cnn inside a 99.9% accuracy budget, chosen
    # on latency measured with ONNX Runtime's kernels on this machine.
    spec = MixedPrecisionSpec(model=ModelRef(zoo="digits-cnn"), batch_size=256)
    with Client(base_url=base_url, api_key=key) as client:
        job = client.jobs.create(spec, name="demo: mixed precision for digits-cnn")
        click.echo(f"submitted {job.id} ({job.kind}, queue {job.queue})")
        job = client.jobs.wait(job.id, progress=True)
        click.echo(format_result(job))
        for art in job.artifacts:
            click.echo(f"  artifact  {art.name} ({art.size:,} bytes): "
                       f"{base_url}/v1/jobs/{job.id}/artifacts/{art.name}")


@main.command()
@click.option("--queues", default=None, help="Comma-separated queues (default: cpu, +gpu with CUDA).")
@click.option("--concurrency", "-c", type=int, default=1, show_default=True)
@click.option("--name", default="worker", show_default=True)
def worker(queues: str | None, concurrency: int, name: str) -> None:
    """Run a Celery worker in the foreground (needs MODELPRESS_REDIS_URL)."""
    settings = _settings()
    if settings.redis_url is None:
        raise click.UsageError("set MODELPRESS_REDIS_URL (or use `modelpress serve`)")
    _check_store(settings)
    import torch

    # stripped as MODELPRESS_WORKER_QUEUES is: "cpu, gpu" made Celery consume " gpu"
    qs = ([q.strip() for q in queues.split(",") if q.strip()] if queues
          else settings.queues_for_worker(torch.cuda.is_available()))
    if not qs:
        raise click.BadParameter("name at least one queue, e.g. cpu or gpu", param_hint="--queues")
    args = [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
            "-Q", ",".join(qs), "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]
    os.execve(sys.executable, args, _stack.worker_env(os.environ))


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=click.IntRange(0, 65535), default=None)
def api(host: str | None, port: int | None) -> None:
    """Run the API server in the foreground (needs MODELPRESS_REDIS_URL)."""
    settings = _settings()
    if settings.redis_url is None:
        raise click.UsageError("set MODELPRESS_REDIS_URL (or use `modelpress serve`)")
    _check_store(settings)
    import uvicorn

    uvicorn.run("app.main:app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port)


# ---- admin ---------------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """API keys (talks to Redis directly: an operator command)."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key belongs to.")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
def keys_create(tenant: str, name: str) -> None:
    """Create a key for TENANT and print it (only its hash is stored)."""
    settings = _settings()
    if not TENANT_RE.fullmatch(tenant):
        raise click.BadParameter("lowercase letters, digits, '-' and '_' (1-63)", param_hint="--tenant")
    url, local = settings.redis_url, settings.data_dir / "redis-url"
    from_serve = url is None
    if url is None:
        if not local.exists():
            raise click.UsageError(f"set MODELPRESS_REDIS_URL to the service's Redis (no local "
                                   f"`modelpress serve` is running here: no {local})")
        url = local.read_text().strip()
    try:
        token = create_key(redis.Redis.from_url(url), tenant, name)
    except redis.ConnectionError as exc:
        # serve removes its file on exit; one that was killed leaves it behind
        hint = (f"; {local} is left by a `modelpress serve` that no longer runs: start it again "
                f"or set MODELPRESS_REDIS_URL") if from_serve else ""
        raise click.UsageError(f"could not reach Redis at {url}: {exc}{hint}") from None
    click.echo(token)


# ---- assets and jobs -----------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Upload, list and delete models."""


@models.command("upload")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", default=None)
@click.pass_context
def models_upload(ctx: click.Context, path: Path, name: str | None) -> None:
    """Upload a torch.export .pt2 file or a Hugging Face model folder."""
    with _client(ctx) as c:
        _print_json(c.models.upload(path, name=name).model_dump(mode="json"))


@models.command("list")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True,
              help="How many, newest first.")
@click.option("--all", "every", is_flag=True, help="All of them, following the pages.")
@click.pass_context
def models_list(ctx: click.Context, limit: int, every: bool) -> None:
    with _client(ctx) as c:
        for m in c.models.iter() if every else c.models.list(limit=limit):
            click.echo(f"{m.id}  {m.format:<4} {m.size:>12,}  {m.name}")


@models.command("delete")
@click.argument("model_id")
@click.pass_context
def models_delete(ctx: click.Context, model_id: str) -> None:
    """Delete an uploaded model (refused while a queued or running job names it)."""
    with _client(ctx) as c:
        _echo_deleted(c.models.delete(model_id))


def _echo_deleted(d: Deleted) -> None:
    click.echo(f"{d.id} deleted ({d.files_removed} stored file{'s' * (d.files_removed != 1)} "
               "removed)")


@main.group()
def datasets() -> None:
    """Upload, list and delete datasets."""


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None)
@click.pass_context
def datasets_upload(ctx: click.Context, path: Path, name: str | None) -> None:
    """Upload an .npz or .safetensors file with inputs `x` (and labels `y`)."""
    with _client(ctx) as c:
        _print_json(c.datasets.upload(path, name=name).model_dump(mode="json"))


@datasets.command("list")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True,
              help="How many, newest first.")
@click.option("--all", "every", is_flag=True, help="All of them, following the pages.")
@click.pass_context
def datasets_list(ctx: click.Context, limit: int, every: bool) -> None:
    with _client(ctx) as c:
        for d in c.datasets.iter() if every else c.datasets.list(limit=limit):
            click.echo(f"{d.id}  {d.format:<11} {d.size:>12,}  {d.name}")


@datasets.command("delete")
@click.argument("dataset_id")
@click.pass_context
def datasets_delete(ctx: click.Context, dataset_id: str) -> None:
    """Delete an uploaded dataset (refused while a queued or running job names it)."""
    with _client(ctx) as c:
        _echo_deleted(c.datasets.delete(dataset_id))


@main.group()
def jobs() -> None:
    """Submit, list, follow, cancel and delete jobs and download their artifacts."""


@jobs.command("submit")
@click.argument("spec_file", type=click.File("r"))
@click.option("--name", default=None)
@click.option("--wait/--no-wait", default=False, help="Follow progress until the job ends.")
@click.pass_context
def jobs_submit(ctx: click.Context, spec_file: Any, name: str | None, wait: bool) -> None:
    """Submit the job spec in SPEC_FILE (JSON; '-' reads stdin)."""
    try:
        spec = json.load(spec_file)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="SPEC_FILE") from exc
    with _client(ctx) as c:
        job = c.jobs.create(spec, name=name)
        click.echo(job.id)
        if job.state == "queued" and job.progress.message != WAITING_FOR_WORKER:
            click.echo(f"note: {job.progress.message}", err=True)  # e.g. no worker on its queue
        if wait:
            _follow(c, job.id)


def _follow(c: Client, job_id: str) -> None:
    """Progress until the job ends, then its result; exit 1 unless it succeeded. Ctrl-C stops
    the watching only (exit 130), and says so: the job itself goes on."""
    try:
        job = c.jobs.wait(job_id, progress=True, raise_on_failure=False)
    except KeyboardInterrupt:
        click.echo(f"\nstopped watching; job {job_id} goes on (`modelpress jobs watch {job_id}` "
                   f"follows it again, `modelpress jobs cancel {job_id}` stops it)", err=True)
        sys.exit(130)
    click.echo(format_result(job))
    if job.state != "succeeded":
        sys.exit(1)


@jobs.command("list")
@click.option("--state", default=None)
@click.option("--kind", default=None)
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True,
              help="Jobs to list, newest first (at most 200).")
@click.option("--all", "every", is_flag=True, help="All of them, following the pages.")
@click.pass_context
def jobs_list(ctx: click.Context, state: str | None, kind: str | None, limit: int,
              every: bool) -> None:
    with _client(ctx) as c:
        page = None if every else c.jobs.list(limit=limit, state=state, kind=kind)
        for j in c.jobs.iter(state=state, kind=kind) if page is None else page.items:
            click.echo(f"{j.id}  {j.kind:<16} {j.state:<10} {j.progress.fraction:5.0%}  "
                       f"{j.created_at:%Y-%m-%d %H:%M:%S}  {j.name or ''}")
        if page is not None and page.partial:  # the server stopped at its bound: say so
            click.echo("(the server stopped reading before it found --limit matching jobs; "
                       "older ones may match: add --all)", err=True)


@jobs.command("get")
@click.argument("job_id")
@click.pass_context
def jobs_get(ctx: click.Context, job_id: str) -> None:
    with _client(ctx) as c:
        _print_json(c.jobs.get(job_id).model_dump(mode="json"))


@jobs.command("watch")
@click.argument("job_id")
@click.pass_context
def jobs_watch(ctx: click.Context, job_id: str) -> None:
    """Follow a job's progress until it ends, then print its result."""
    with _client(ctx) as c:
        _follow(c, job_id)


@jobs.command("log")
@click.argument("job_id")
@click.option("--tail", type=click.IntRange(1, 10_000), default=200, show_default=True)
@click.pass_context
def jobs_log(ctx: click.Context, job_id: str, tail: int) -> None:
    with _client(ctx) as c:
        for line in c.jobs.log(job_id, tail=tail):
            click.echo(line)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--force", is_flag=True, help="Kill the worker's task instead of asking it to stop.")
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str, force: bool) -> None:
    with _client(ctx) as c:
        job = c.jobs.cancel(job_id, force=force)
        asked = job.cancel_requested and job.state not in FINAL_STATES  # not yet stopped
        click.echo(f"{job.id} {job.state}" + (" (cancel requested)" if asked else ""))


@jobs.command("delete")
@click.argument("job_id")
@click.pass_context
def jobs_delete(ctx: click.Context, job_id: str) -> None:
    """Delete a finished job with its artifacts and logs (cancel a running one first)."""
    with _client(ctx) as c:
        _echo_deleted(c.jobs.delete(job_id))


@jobs.command("download")
@click.argument("job_id")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(), default=".", show_default=True,
              help="File or folder to write to (a new folder: end it with /).")
@click.pass_context
def jobs_download(ctx: click.Context, job_id: str, name: str, output: str) -> None:
    """Download artifact NAME of JOB_ID."""
    with _client(ctx) as c:
        click.echo(c.jobs.download(job_id, name, output))


def _check_store(settings: Settings) -> None:
    """The object-store settings, checked as the worker and the API check them at start-up
    (nothing is called), so a wrong one is one line here, not a child process's traceback."""
    from app.storage import open_store

    try:
        open_store(settings)
    except Exception as exc:  # ValueError for a wrong setting; obstore's own, a folder's OSError
        raise click.ClickException(f"invalid store setting: {exc}") from None


def _settings() -> Settings:
    """The server's settings, or one line per bad one (the variable to fix and why) instead of
    pydantic's traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            where = f"MODELPRESS_{str(loc[0]).upper()}: " if loc else ""
            lines.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
        raise click.ClickException("invalid settings (environment or .env): "
                                   + "; ".join(lines)) from None


def run() -> None:
    """Entry point that turns SDK errors, and OS errors (a download to a folder that cannot
    be made or written), into one clear line and exit code 1."""
    try:
        main(standalone_mode=True)
    except ModelpressError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        click.echo(f"error: {what}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
