"""The FastAPI application: ``uvicorn app.main:app`` or ``modelpress api``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors, pending, retention, stalled, unsent
from app.config import Settings, get_settings
from app.deps import Services
from app.redis_client import async_client
from app.routes import assets, dashboard, health, jobs
from app.storage import open_store
from workers.celery_app import create_celery


def _log_to_stderr() -> None:
    """The API's own log lines (retention sweeps, enqueue failures) at INFO beside uvicorn's;
    left alone when the host application configured logging itself."""
    logger = logging.getLogger("modelpress")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    _log_to_stderr()
    if not settings.redis_url:
        raise RuntimeError("MODELPRESS_REDIS_URL (or REDIS_URL) is not set; `modelpress serve` "
                           "starts an embedded Redis for local use")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = async_client(settings, health_check_interval=30, socket_timeout=60)
        svc = Services(settings, r, open_store(settings), create_celery(settings))
        app.state.services = svc
        loops = [asyncio.create_task(pending.run(svc)), asyncio.create_task(unsent.run(svc)),
                 asyncio.create_task(stalled.run(svc))]
        if settings.job_retention_days > 0:
            loops.append(asyncio.create_task(retention.run(svc)))
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
            await r.aclose()

    app = FastAPI(
        title="modelpress",
        version="0.1.0",
        summary="Compress PyTorch models within an accuracy budget, with every measurement shown.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(assets.router)
    app.include_router(jobs.router)
    dashboard.install(app)
    return app


def app() -> FastAPI:
    """Factory for ``uvicorn --factory app.main:app``."""
    return create_app()
