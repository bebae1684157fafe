"""Exceptions raised by the MoPEQ SDK.

Every error the service answers with is a :class:`MopeqAPIError` carrying the HTTP ``status``, the server's
``detail`` message and its machine-readable ``code`` (``{"detail": ..., "code": ...}`` is the shape of every error
body the API returns). Connection failures are :class:`ServiceUnreachableError`. All of them derive from
:class:`MopeqError`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any


class MopeqError(Exception):
    """Base class of every exception the SDK raises."""


class MopeqAPIError(MopeqError):
    """The service answered with an error status.

    ``status`` is the HTTP status, ``detail`` the server's message (what went wrong and what to change), ``code``
    its machine-readable code (e.g. ``infeasible_budget``, ``not_found``, ``rate_limited``) and ``body`` the whole
    decoded error body (for example ``feasible`` on an infeasible budget, ``errors`` on a validation error).
    """

    def __init__(self, status: int, detail: str, code: str | None = None, body: dict[str, Any] | None = None,
                 *, method: str | None = None, url: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.detail, self.code = status, detail, code
        self.body = body or {}
        self.method, self.url = method, url
        self.headers = headers or {}
        where = f" ({method} {url})" if method and url else ""
        super().__init__(f"{status}{' ' + code if code else ''}: {detail}{where}")


class AuthenticationError(MopeqAPIError):
    """401 (missing, unknown or revoked API key) or 403 (the key lacks the scope the route needs)."""


class NotFoundError(MopeqAPIError):
    """404: no such job (or it belongs to another key), or no such artifact."""


class ValidationError(MopeqAPIError):
    """400 / 413 / 422: the request was rejected as invalid; ``detail`` says what to change."""


class ConflictError(MopeqAPIError):
    """409: the job is not in a state that allows this (e.g. the bit map of a job that has not succeeded)."""


class RateLimitError(MopeqAPIError):
    """429 after the client's retries: rate or concurrency limit; ``retry_after`` is the server's hint (seconds)."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class ServerError(MopeqAPIError):
    """5xx after the client's retries: the service or one of its dependencies failed."""


class ServiceUnreachableError(MopeqError):
    """The service could not be reached (connection refused, DNS, TLS, timeouts) after the client's retries."""

    def __init__(self, message: str, url: str | None = None):
        self.url = url
        super().__init__(message)


class ChecksumError(MopeqError):
    """A downloaded file's SHA-256 does not match the checksum the service announced (or none was announced)."""

    def __init__(self, message: str, *, name: str | None = None, expected: str | None = None,
                 actual: str | None = None):
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(message)


class WaitTimeoutError(MopeqError):
    """``wait(..., timeout=...)`` ran out of time before the job reached a final status; ``job`` is the last seen."""

    def __init__(self, message: str, job: Any = None):
        self.job = job
        super().__init__(message)


class StreamError(MopeqError):
    """The event stream could not be opened or read (not ``text/event-stream``, cut off, malformed)."""


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


_BY_STATUS: dict[int, type[MopeqAPIError]] = {
    400: ValidationError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    409: ConflictError, 413: ValidationError, 422: ValidationError, 429: RateLimitError,
}


def error_class(status: int) -> type[MopeqAPIError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return MopeqAPIError


__all__ = [
    "AuthenticationError", "ChecksumError", "ConflictError", "MopeqAPIError", "MopeqError", "NotFoundError",
    "RateLimitError", "ServerError", "ServiceUnreachableError", "StreamError", "ValidationError",
    "WaitTimeoutError", "error_class", "parse_retry_after",
]
