"""The FastAPI application: ``uvicorn app.main:app`` or ``modelpress api``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors
from app.config import Settings, get_settings
from app.deps import Services
from app.redis_client import async_client
from app.routes import assets, dashboard, health, jobs
from app.storage import open_store
from workers.celery_app import create_celery


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("MODELPRESS_REDIS_URL (or REDIS_URL) is not set; `modelpress serve` "
                           "starts an embedded Redis for local use")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = async_client(settings, health_check_interval=30, socket_timeout=60)
        app.state.services = Services(settings, r, open_store(settings), create_celery(settings))
        try:
            yield
        finally:
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
