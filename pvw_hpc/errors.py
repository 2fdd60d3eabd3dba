"""Errors the service raises, each carrying the HTTP status the API answers with.

The service never speaks HTTP, but every failure a client can cause or see has
exactly one status, decided here, so the REST layer and the CLI agree.
"""

from __future__ import annotations

from typing import Any


class LaunchError(Exception):
    """Base class: ``status`` is the HTTP status, ``extra`` goes into the JSON body."""

    status = 500

    def __init__(self, message: str, *, cookie: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra
        self.cookie = cookie  # set as the re-attach cookie by the REST layer, never put in the body

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


class BadRequest(LaunchError):
    """The request itself is wrong (bad JSON, unknown app, a value that fails its rule)."""

    status = 400


class Unauthorized(LaunchError):
    status = 401


class Forbidden(LaunchError):
    status = 403


class NotFound(LaunchError):
    status = 404


class Conflict(LaunchError):
    status = 409


class PayloadTooLarge(LaunchError):
    status = 413


class TooManyRequests(LaunchError):
    """A per-user limit: the body names the limit and, when known, when capacity returns."""

    status = 429


class Unavailable(LaunchError):
    """No capacity, a failed start, or not ready in time: the client may retry (launcherRetry)."""

    status = 503
