"""Client configuration: explicit arguments win over the environment.

Environment names (all optional). The tuning ones carry a CLIENT_ prefix so that they never
collide with the service's own settings (its METRICS_FLUSH_INTERVAL_S is another thing):

    METRICS_SERVICE_URL                base URL of the metrics service, e.g. http://metrics:8890
    METRICS_API_KEY                    the key issued for this service
    METRICS_SERVICE_NAME               the service name the key was issued for
    METRICS_SERVICE_VERSION            reported as "version" (default "unknown")
    METRICS_INSTANCE_ID                reported as "instance_id" (default host-pid)
    METRICS_CLIENT_ENABLED             "false" turns reporting off
    METRICS_CLIENT_MAX_QUEUE_SIZE      events held before the oldest are dropped (10000)
    METRICS_CLIENT_MAX_BATCH_SIZE      events per POST, at most 1000 (100)
    METRICS_CLIENT_FLUSH_INTERVAL_S    longest time an event waits before it is sent (2.0)
    METRICS_CLIENT_TIMEOUT_S           HTTP timeout per POST (5.0)
    METRICS_CLIENT_BACKOFF_MAX_S       longest wait between retries (30.0)
    METRICS_CLIENT_SHUTDOWN_TIMEOUT_S  how long close() may spend flushing (5.0)
    METRICS_CLIENT_SPOOL_PATH          a directory: keep events on disk until acknowledged (off)
    METRICS_CLIENT_SPOOL_MAX_BYTES     the spool's bound; the oldest events go first (64 MiB)
    METRICS_HASH_SALT                  salt for hashed user ids and queries (see hash_value)
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["ClientConfig"]

MAX_BATCH_SIZE_LIMIT = 1000  # the service accepts at most 1000 metrics per request
MAX_BODY_BYTES = 1024 * 1024  # the service's request body limit

_T = TypeVar("_T")


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


@dataclass(frozen=True)
class ClientConfig:
    """Everything the metrics client needs; build it with `ClientConfig.from_env(...)`."""

    url: str | None = None
    api_key: str | None = None
    service: str = "unknown-service"
    version: str = "unknown"
    instance_id: str | None = None
    enabled: bool = True
    max_queue_size: int = 10_000
    max_batch_size: int = 100
    flush_interval_s: float = 2.0
    timeout_s: float = 5.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    shutdown_timeout_s: float = 5.0
    spool_path: str | None = None
    spool_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            raise ValueError(f"max_batch_size must be between 1 and {MAX_BATCH_SIZE_LIMIT}")
        for name in ("flush_interval_s", "timeout_s", "backoff_base_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must not be negative")
        if self.spool_max_bytes < 2 * MAX_BODY_BYTES:
            raise ValueError(f"spool_max_bytes must be at least {2 * MAX_BODY_BYTES}")

    @property
    def active(self) -> bool:
        """True when events are actually sent: enabled, with a URL and an API key."""
        return self.enabled and bool(self.url) and bool(self.api_key)

    @property
    def endpoint(self) -> str:
        """The full ingest URL: `<url>/metrics` unless the URL already names it."""
        base = (self.url or "").rstrip("/")
        return base if base.endswith("/metrics") else base + "/metrics"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """Read `METRICS_*` variables; keyword arguments that are not None win.

        A malformed variable raises ValueError naming it, at start-up rather than on the hot path.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def take(field: str, var: str, parse: Callable[[str], _T]) -> None:
            raw = env.get(var)
            if raw is None or raw == "":
                return
            try:
                values[field] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"invalid {var}={raw!r}: {exc}") from None

        take("url", "METRICS_SERVICE_URL", str)
        take("api_key", "METRICS_API_KEY", str)
        take("service", "METRICS_SERVICE_NAME", str)
        take("version", "METRICS_SERVICE_VERSION", str)
        take("instance_id", "METRICS_INSTANCE_ID", str)
        take("enabled", "METRICS_CLIENT_ENABLED", _parse_bool)
        take("max_queue_size", "METRICS_CLIENT_MAX_QUEUE_SIZE", int)
        take("max_batch_size", "METRICS_CLIENT_MAX_BATCH_SIZE", int)
        take("flush_interval_s", "METRICS_CLIENT_FLUSH_INTERVAL_S", float)
        take("timeout_s", "METRICS_CLIENT_TIMEOUT_S", float)
        take("backoff_max_s", "METRICS_CLIENT_BACKOFF_MAX_S", float)
        take("shutdown_timeout_s", "METRICS_CLIENT_SHUTDOWN_TIMEOUT_S", float)
        take("spool_path", "METRICS_CLIENT_SPOOL_PATH", str)
        take("spool_max_bytes", "METRICS_CLIENT_SPOOL_MAX_BYTES", int)
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown metrics client option {key!r}")
            if value is not None:
                values[key] = value
        if values.get("instance_id") is None:
            values["instance_id"] = f"{socket.gethostname()}-{os.getpid()}"
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"invalid metrics client configuration: {exc}") from None
