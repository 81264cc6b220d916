"""One error shape for every failure: ``{"error": {"type", "message", "fields"?}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, get_args

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.schemas import JobKind

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


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    # Drop the "body" root and pydantic's union tag (the job kind) so the path reads like the JSON.
    parts = [str(p) for p in loc if p != "body"]
    if len(parts) >= 2 and parts[0] == "spec" and parts[1] in get_args(JobKind):
        parts.pop(1)
    return ".".join(parts) or "body"


def _field_error(error: Mapping[str, Any]) -> dict[str, Any]:
    if error.get("type") == "json_invalid":  # its loc is ("body", the character's position)
        loc = list(error.get("loc", ()))
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (error.get("ctx") or {}).get("error", "")
        return {"field": "body", "message": f"not valid JSON{at}: {reason or 'decode error'}",
                "type": "json_invalid"}
    return {"field": field_path(error.get("loc", ())), "message": error.get("msg", ""),
            "type": error.get("type")}


MAX_HEADER_BYTES = 16 * 1024  # all header names and values together, as h11 allows by default
MAX_HEADERS = 100  # as Apache's LimitRequestFields


class HeaderLimit:
    """Refuses a request with huge or very many headers (431) before any route sees it: uvicorn's
    h11 parser lets through a header block that arrives in one read, however large."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) for k, v in headers)
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                message = (f"request headers too large: {len(headers)} headers of {size} bytes; "
                           f"at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes")
                response = JSONResponse(body(431, message, "headers_too_large"), 431)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


REDIS_DOWN = "the job store (Redis) is unavailable; try again shortly"
REDIS_RETRY_S = "5"


def log_redis_down(request: Request, exc: Exception) -> None:
    log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    # Redis unreachable past the client's retries (a restart that takes long): the request can
    # succeed later, so say so instead of answering 500
    log_redis_down(request, exc)
    return JSONResponse(body(503, REDIS_DOWN), 503, {"Retry-After": REDIS_RETRY_S})


def install(app: FastAPI) -> None:
    app.add_middleware(HeaderLimit)
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.status, exc.message, exc.type), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()) and ctype != "application/json":
            # FastAPI reads a non-JSON body as bytes; say what to send, not "not a dictionary"
            return JSONResponse(body(415, "send the body as a JSON object with Content-Type "
                                     f"application/json (got {ctype or 'none'!r})"), 415)
        fields = [_field_error(e) for e in exc.errors()]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return JSONResponse(body(422, message or "invalid request", fields=fields), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            body(exc.status_code, str(exc.detail)), exc.status_code, getattr(exc, "headers", None)
        )

    app.add_exception_handler(redis.ConnectionError, redis_down)
    app.add_exception_handler(redis.TimeoutError, redis_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(body(500, "internal error; the server log has the details", "internal"), 500)
