"""Typed settings, read from the environment.

Explicit arguments win over the environment, so a test writes
``Settings(db_path=tmp_path / "m.db")``. Every field has the environment name that sets it
(``env_names()`` lists them); a bad value stops start-up with a message naming that variable.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metrics_service.errors import ConfigError

log = logging.getLogger(__name__)
API_KEY_ENV_PREFIX = "METRICS_API_KEY_"
_SERVICE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class AckMode(StrEnum):
    durable = "durable"
    buffered = "buffered"


class Synchronous(StrEnum):
    full = "full"
    normal = "normal"


class OtlpProtocol(StrEnum):
    grpc = "grpc"
    http_protobuf = "http/protobuf"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class BoolLabels(StrEnum):
    """How boolean labels (``success``) are exported: ``true``/``false`` (the default, as the
    newer upstream does) or ``True``/``False`` (dashboards built on the pinned reference)."""

    lowercase = "lower"
    capitalized = "capitalized"


def _env(name: str, default: Any, **kwargs: Any) -> Any:
    # The field name stays usable as a keyword argument; the environment name is the alias.
    return Field(default, validation_alias=AliasChoices(name), **kwargs)


class Settings(BaseSettings):
    """All settings of the service.

    >>> Settings(db_path="/tmp/m.db", port=0).port
    0
    """

    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", case_sensitive=False, frozen=True
    )

    # HTTP
    host: str = _env("METRICS_SERVICE_HOST", "127.0.0.1")
    port: int = _env("METRICS_SERVICE_PORT", 8890, ge=0, le=65535)
    max_request_bytes: int = _env("METRICS_MAX_REQUEST_BYTES", 1_048_576, ge=1024)
    request_timeout_s: float = _env("METRICS_REQUEST_TIMEOUT_S", 10.0, gt=0)
    admin_enabled: bool = _env("METRICS_ADMIN_ENABLED", True)
    admin_api_key: str | None = _env("METRICS_ADMIN_API_KEY", None, repr=False)

    # Validation limits
    max_metrics_per_request: int = _env("METRICS_MAX_METRICS_PER_REQUEST", 1000, ge=1, le=100_000)
    max_dimensions: int = _env("METRICS_MAX_DIMENSIONS", 32, ge=1, le=1000)
    max_string_length: int = _env("METRICS_MAX_STRING_LENGTH", 256, ge=8, le=65_536)
    max_metadata_bytes: int = _env("METRICS_MAX_METADATA_BYTES", 4096, ge=2, le=1_048_576)
    max_future_skew_s: float = _env("METRICS_MAX_FUTURE_SKEW_S", 300.0, ge=0)

    # Storage and the write path
    # Unset: SQLite at SQLITE_DB_PATH; sqlite:///path; postgresql://... (docs/storage.md).
    database_url: str | None = _env("METRICS_DATABASE_URL", None, repr=False)
    db_path: Path = _env("SQLITE_DB_PATH", Path("data/metrics.db"))
    sqlite_synchronous: Synchronous = _env("METRICS_SQLITE_SYNCHRONOUS", Synchronous.full)
    sqlite_busy_timeout_ms: int = _env("METRICS_SQLITE_BUSY_TIMEOUT_MS", 5000, ge=0)
    ack_mode: AckMode = _env("METRICS_ACK_MODE", AckMode.durable)
    flush_interval_s: float = _env("METRICS_FLUSH_INTERVAL_S", 5.0, gt=0)
    commit_max_rows: int = _env("METRICS_COMMIT_MAX_ROWS", 10_000, ge=1)
    commit_linger_ms: float = _env("METRICS_COMMIT_LINGER_MS", 0.0, ge=0, le=1000)
    commit_retries: int = _env("METRICS_COMMIT_RETRIES", 3, ge=0, le=100)
    queue_max_metrics: int = _env("METRICS_QUEUE_MAX_METRICS", 50_000, ge=1)
    shutdown_timeout_s: float = _env("METRICS_SHUTDOWN_TIMEOUT_S", 30.0, gt=0)
    # How long a committed Idempotency-Key is remembered (docs/delivery.md).
    idempotency_window_s: float = _env("METRICS_IDEMPOTENCY_WINDOW_S", 86_400.0, ge=1)

    # OTLP/HTTP trace ingest (POST /v1/traces, docs/otlp.md)
    otlp_ingest_enabled: bool = _env("METRICS_OTLP_INGEST_ENABLED", True)
    otlp_max_spans_per_request: int = _env(
        "METRICS_OTLP_MAX_SPANS_PER_REQUEST", 10_000, ge=1, le=1_000_000
    )

    # Keys, rate limits and abuse
    rate_limit_per_min: int = _env("METRICS_RATE_LIMIT", 1000, ge=1)
    rate_limit_storage_uri: str = _env("METRICS_RATE_LIMIT_STORAGE_URI", "memory://")
    auth_failure_limit_per_min: int = _env("METRICS_AUTH_FAILURE_LIMIT", 30, ge=1)
    #: Addresses or networks (comma-separated, e.g. ``10.0.0.0/8,127.0.0.1``) of the reverse
    #: proxies in front of the service: from these peers only, ``X-Forwarded-For`` names the client.
    trusted_proxies: str = _env("METRICS_TRUSTED_PROXIES", "")
    key_reload_interval_s: float = _env("METRICS_KEY_RELOAD_INTERVAL_S", 2.0, gt=0)
    # Route limits (slowapi, metrics_service/route_limits.py) on the regular routes, in the
    # `limits` notation ("120/minute", "10/second;500/hour"); the ingest routes have the above.
    analytics_rate_limit: str = _env("METRICS_ANALYTICS_RATE_LIMIT", "120/minute")
    route_rate_limit: str = _env("METRICS_ROUTE_RATE_LIMIT", "600/minute")
    route_rate_limit_per_address: str = _env("METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS", "1200/minute")
    #: ``service:alias,service:alias``: keys of ``service`` may also report as ``alias``.
    service_aliases: str = _env("METRICS_SERVICE_ALIASES", "")

    # Retention
    retention_days: int = _env("METRICS_RETENTION_DAYS", 90, ge=1, le=36_500)
    retention_interval_s: float = _env("METRICS_RETENTION_INTERVAL_S", 3600.0, gt=0)
    retention_chunk_rows: int = _env("METRICS_RETENTION_CHUNK_ROWS", 5000, ge=1)
    retention_max_share: float = _env("METRICS_RETENTION_MAX_SHARE", 0.25, gt=0, le=1)
    rollup_retention_days: int = _env("METRICS_ROLLUP_RETENTION_DAYS", 400, ge=1, le=36_500)
    #: SQLite: how long committed rows may wait before the rollups take them in (queries read
    #: the rows not taken in yet from the raw table, so answers stay exact); 0: every commit.
    rollup_fold_interval_s: float = _env("METRICS_ROLLUP_FOLD_INTERVAL_S", 0.5, ge=0, le=60)

    # OpenTelemetry export
    otel_service_name: str = _env("OTEL_SERVICE_NAME", "mcp-metrics-service", min_length=1)
    otel_prometheus_enabled: bool = _env("OTEL_PROMETHEUS_ENABLED", True)
    otel_prometheus_host: str = _env("OTEL_PROMETHEUS_HOST", "127.0.0.1")
    otel_prometheus_port: int = _env("OTEL_PROMETHEUS_PORT", 9465, ge=0, le=65535)
    otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otlp_metrics_endpoint: str | None = _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", None)
    otlp_protocol: OtlpProtocol = _env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    otlp_headers: str = _env("OTEL_EXPORTER_OTLP_HEADERS", "", repr=False)
    otlp_timeout_ms: int = _env("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000, ge=1)
    otel_export_interval_ms: int = _env("OTEL_METRIC_EXPORT_INTERVAL", 60_000, ge=100)
    otel_cardinality_limit: int = _env("METRICS_OTEL_CARDINALITY_LIMIT", 500, ge=10, le=1_000_000)
    otel_bool_labels: BoolLabels = _env("METRICS_OTEL_BOOL_LABELS", BoolLabels.lowercase)
    # The two name sets of the export: the architecture document's (mcp_tool_executions_total,
    # ...) and the OpenTelemetry MCP semantic conventions (mcp.server.operation.duration, ...).
    otel_seed_metrics_enabled: bool = _env("METRICS_OTEL_SEED_METRICS", True)
    otel_semconv_metrics_enabled: bool = _env("METRICS_OTEL_SEMCONV_METRICS", True)

    # Logs
    log_level: str = _env("METRICS_LOG_LEVEL", "info")
    log_format: LogFormat = _env("METRICS_LOG_FORMAT", LogFormat.text)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in {"memory", "redis", "rediss", "redis+sentinel", "redis+cluster"}:
            raise ValueError("must be memory:// or a redis:// URI")
        return value

    @field_validator("analytics_rate_limit", "route_rate_limit", "route_rate_limit_per_address")
    @classmethod
    def _limit_string(cls, value: str) -> str:
        from limits import parse_many

        try:
            items = parse_many(value)
        except ValueError:
            items = []
        if not items or any(item.amount < 1 for item in items):
            raise ValueError("must be a limit such as 120/minute or 10/second;500/hour")
        return value

    @field_validator("service_aliases")
    @classmethod
    def _aliases(cls, value: str) -> str:
        parse_aliases(value)
        return value

    def alias_map(self) -> dict[str, tuple[str, ...]]:
        """``METRICS_SERVICE_ALIASES`` as service -> its further names."""
        return parse_aliases(self.service_aliases)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                try:
                    ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not an IP address or network") from None
        return value

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in self.trusted_proxies.split(",")
            if part.strip()
        )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        from metrics_service.storage.backend import parse_database_url

        try:
            parse_database_url(value)
        except ConfigError as exc:
            # The message without the variable's name (load_settings adds it) and redacted.
            raise ValueError(str(exc).split(": ", 1)[1]) from None
        return value or None

    @field_validator("admin_api_key")
    @classmethod
    def _admin_key(cls, value: str | None) -> str | None:
        # Empty is what compose passes for an unset ${VARIABLE}: no admin key, as when unset.
        if not value:
            return None
        if len(value) < 16:
            raise ValueError("an API key must be at least 16 characters")
        return value

    @field_validator("otlp_endpoint", "otlp_metrics_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def otlp_header_map(self) -> dict[str, str]:
        """``OTEL_EXPORTER_OTLP_HEADERS`` (``k=v,k2=v2``, values URL-encoded) as a dict."""
        from urllib.parse import unquote

        headers = {}
        for part in self.otlp_headers.split(","):
            if "=" in part:
                key, value = part.split("=", 1)
                headers[key.strip().lower()] = unquote(value.strip())
        return headers


def env_names() -> dict[str, str]:
    """Field name -> the environment variable that sets it."""
    names = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        assert isinstance(alias, AliasChoices)
        names[name] = str(alias.choices[0])
    return names


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, turning a bad value into a ``ConfigError``."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        names = env_names()
        problems = []
        for err in exc.errors():
            loc = str(err["loc"][0]) if err["loc"] else "?"
            var = names.get(loc, loc.upper())
            # A secret's value is never printed, not even a wrong one.
            secret = any(
                not field.repr
                for name, field in Settings.model_fields.items()
                if names[name] == var
            )
            got = "" if secret else f" (got {err.get('input')!r})"
            problems.append(f"{var}: {err['msg']}{got}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    """``auth:auth-server,registry-service:registry`` -> {service: (alias, ...)}."""
    out: dict[str, dict[str, None]] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        service, sep, alias = (p.strip() for p in part.partition(":"))
        if not sep or not valid_service_name(service) or not valid_service_name(alias):
            raise ValueError(
                f"{part!r}: each entry is service:alias, both lower-case service names"
            )
        if alias != service:
            out.setdefault(service, {})[alias] = None
    return {service: tuple(names) for service, names in out.items()}


def service_name_from_env(var: str) -> str:
    """``METRICS_API_KEY_MY_SERVICE`` -> ``my-service``."""
    return var[len(API_KEY_ENV_PREFIX) :].lower().replace("_", "-")


def env_api_keys(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Ingest keys from ``METRICS_API_KEY_<NAME>`` variables: service name -> key."""
    environ = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    for var, value in environ.items():
        if not var.upper().startswith(API_KEY_ENV_PREFIX) or len(var) == len(API_KEY_ENV_PREFIX):
            continue
        service = service_name_from_env(var.upper())
        if value == "":
            # What compose passes for an unset ${VARIABLE}: no key, not a broken start.
            log.warning("%s is empty: no key for service %r", var, service)
            continue
        if not _SERVICE_NAME_RE.match(service):
            raise ConfigError(f"{var}: service name {service!r} is not a valid service name")
        if len(value) < 16:
            raise ConfigError(f"{var}: an API key must be at least 16 characters")
        keys[service] = value
    return keys


def valid_service_name(name: str) -> bool:
    return bool(_SERVICE_NAME_RE.match(name))
