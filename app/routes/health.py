from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServicesDep
from app.jobs import served_queues
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (liveness)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready to take jobs: Redis answers, the object store answers, a worker is alive and
    consumes the default queue (where jobs with device `auto`/`cpu` go)."""
    checks: dict[str, str] = {}
    try:
        await svc.redis.ping()
        checks["redis"] = "ok"
        alive, queues = await served_queues(svc)
        served = "" if queues is None else f"; queues {', '.join(sorted(queues))}"
        default = svc.settings.default_queue
        if not alive:
            checks["worker"] = "no worker alive"
        elif queues is not None and default not in queues:
            checks["worker"] = (f"no worker consumes the default queue `{default}` "
                                f"({alive} alive{served})")
        else:
            checks["worker"] = f"ok ({alive} alive{served})"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
        checks["worker"] = "unknown"
    try:
        await svc.store.ping()
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
    ok = all(v.startswith("ok") for v in checks.values())
    health = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(health.model_dump(), status_code=200 if ok else 503)
