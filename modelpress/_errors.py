"""Error classes: one per way a call can fail, all under :class:`ModelpressError`."""

from __future__ import annotations

from typing import Any

import httpx


class ModelpressError(Exception):
    """Base class of every error this SDK raises."""


class InvalidArgumentError(ModelpressError, ValueError):
    """An argument refused before anything is sent: an id or artifact name that is not one
    path segment (it would reach another route or write outside the destination), or a base
    URL that is not http(s). Retrying cannot help, so none is made."""


class APIConnectionError(ModelpressError):
    """The service could not be reached (after retries)."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (after retries)."""


class APIResponseValidationError(ModelpressError, ValueError):
    """The service answered with a success status but a body this SDK cannot read: the base
    URL names another service (a proxy's sign-in page, another program on that port), or the
    service runs another version of the API. Retrying cannot help, so none is made."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code


class APIStatusError(ModelpressError):
    """The service answered with a 4xx or 5xx status (or a redirect, which is not followed)."""

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: Any | None) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        self.type: str | None = err.get("type") if isinstance(err, dict) else None
        self.fields: list[dict[str, Any]] | None = err.get("fields") if isinstance(err, dict) else None


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class PayloadTooLargeError(APIStatusError):
    status_code = 413


class UnsupportedMediaTypeError(APIStatusError):
    status_code = 415


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    """A 5xx answer."""


class JobFailedError(ModelpressError):
    """``wait()`` saw the job end in ``failed`` or ``cancelled``."""

    def __init__(self, job: Any) -> None:
        err = getattr(job, "error", None)
        reason = f": {err.type}: {err.message}" if err else ""
        super().__init__(f"job {job.id} {job.state}{reason}")
        self.job = job


class WaitTimeoutError(ModelpressError, TimeoutError):
    """``jobs.wait(timeout=...)`` ran out before the job ended; the job goes on."""


class IntegrityError(ModelpressError):
    """A download's bytes do not hash to the sha256 the server recorded for the artifact (its
    ETag): damaged in the store or in transit. Nothing is left at the destination."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"artifact {name!r}: downloaded sha256 {actual} but the server recorded "
                         f"{expected}; the file was not kept, download it again")
        self.expected, self.actual = expected, actual


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError, 422: UnprocessableEntityError, 429: RateLimitError,
}


NO_KEY_HINT = ("; no API key was sent: pass api_key=... to the client (the CLI's --api-key) or "
               "set MODELPRESS_API_KEY (`modelpress serve` prints its key and saves it under its "
               "data folder, and sends it only to its own address)")


def status_error(response: httpx.Response) -> APIStatusError:
    """The error class and message of a 4xx or 5xx answer; a 401 to a request that carried no
    key says how to give one."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    message = f"{response.status_code}: {message or response.text[:300] or response.reason_phrase}"
    if response.is_redirect:  # an http:// address a proxy sends on to https://, say
        message = (f"{response.status_code}: {_what(response)} is redirected to "
                   f"{response.headers['location']}; set the base URL (base_url, "
                   "MODELPRESS_BASE_URL) to the address the API answers on (the SDK does not "
                   "follow redirects)")
    if response.status_code == 401 and not _key_sent(response):
        message += NO_KEY_HINT
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response=response, body=body)


def _key_sent(response: httpx.Response) -> bool:
    try:
        return "authorization" in response.request.headers
    except RuntimeError:  # a response made without a request: nothing to tell
        return True


def _what(response: httpx.Response) -> str:
    try:
        return f"{response.request.method} {response.request.url}"
    except RuntimeError:
        return "the request"
