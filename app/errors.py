"""One error shape for every failure: ``{"error": {"type", "message", "fields"?}}``."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("modelpress.api")

_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _STATUS_TYPES.get(status, "error")
        self.headers = headers


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"{what} {ident!r} not found")


def body(status: int, message: str, type_: str | None = None, **extra: Any) -> dict[str, Any]:
    detail: dict[str, Any] = {"type": type_ or _STATUS_TYPES.get(status, "error"), "message": message}
    detail.update({k: v for k, v in extra.items() if v is not None})
    return {"error": detail}


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    # Drop the "body" root and pydantic's union tag (the job kind) so the path reads like the JSON.
    parts = [str(p) for p in loc if p != "body"]
    if len(parts) >= 2 and parts[0] == "spec" and parts[1] in {"benchmark"}:
        parts.pop(1)
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.status, exc.message, exc.type), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": _field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return JSONResponse(body(422, message or "invalid request", fields=fields), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            body(exc.status_code, str(exc.detail)), exc.status_code, getattr(exc, "headers", None)
        )

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # Redis unreachable past the client's retries (a restart that takes long): the request
        # can succeed later, so say so instead of answering 500
        log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(body(503, "the job store (Redis) is unavailable; try again shortly"),
                            503, {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(body(500, "internal error; the server log has the details", "internal"), 500)
