"""Celery configuration. Importing this module does not import torch, so the API can use it to
enqueue. The worker runs ``celery -A workers.celery_app:celery_app worker`` (or
``modelpress worker``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from app.config import Settings, get_settings

QUEUES = ("cpu", "gpu")


def create_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise RuntimeError("set MODELPRESS_REDIS_URL (or REDIS_URL) for the Celery broker")
    app = Celery("modelpress", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        # A job is acknowledged only when it is done; a worker that dies mid-job (even by
        # SIGKILL) leaves it unacknowledged, so Redis hands it to another worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live on the job record, not in a Celery backend
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.soft_time_limit_s,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu sweeps for expired unacked deliveries every interval x throttle seconds
            # (100 s by default); one cheap ZRANGE per sweep, so sweep every <= 10 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue=settings.default_queue,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_track_started=False,
        # Pool processes import the engine (torch, ONNX Runtime: ~4 s) as they start (see
        # workers.tasks); Celery's default 4 s wait for a new process would kill them.
        worker_proc_alive_timeout=60.0,
        # With REMAP_SIGTERM=SIGQUIT in the worker's environment (set by `modelpress worker`
        # and serve), SIGTERM is a cold shutdown: the job gets this long to end, then it is
        # cancelled and its unacknowledged message goes back to the queue at once.
        worker_soft_shutdown_timeout=settings.worker_stop_grace_s,
    )
    validate(app)
    return app


def validate(app: Celery) -> None:
    """Refuse to start with a visibility timeout that would re-deliver a job still running."""
    opts: dict[str, Any] = app.conf.broker_transport_options or {}
    vt, limit = opts.get("visibility_timeout"), app.conf.task_time_limit
    if vt is None or limit is None or vt <= limit:
        raise RuntimeError(
            f"broker visibility_timeout ({vt}) must exceed task_time_limit ({limit}); otherwise a "
            "long job is handed to a second worker while the first still runs it"
        )


def __getattr__(name: str) -> Any:
    # Built on first use so importing this module never needs a configured Redis.
    if name == "celery_app":
        settings = get_settings()
        app = create_celery(settings)
        # A worker refuses to start with a store setting every job would fail on (the store is
        # built, which checks the settings; nothing is called). Its tasks open their own later.
        from app.storage import open_store

        open_store(settings)
        globals()["celery_app"] = app
        return app
    raise AttributeError(name)
