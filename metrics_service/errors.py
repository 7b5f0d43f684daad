"""Exceptions that carry what an HTTP response or the CLI needs to say.

One handler in ``api`` turns an ``ApiError`` into the stable JSON error body::

    {"error": {"code": "rate_limited", "message": "...", "details": [...]}, "request_id": "..."}

Exception text from anything else never reaches a response; it goes to the log.
"""

from __future__ import annotations

from typing import Any


class MetricsServiceError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MetricsServiceError):
    """A setting has a bad value; the message names the environment variable."""


class StorageError(MetricsServiceError):
    """The database could not do what was asked (full disk, locked, I/O error)."""


class ApiError(MetricsServiceError):
    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400
    code = "invalid_json"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class InvalidPayload(ApiError):
    status = 422
    code = "validation_failed"


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
