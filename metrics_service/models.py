"""Pydantic models at the HTTP boundary: the OpenAPI schema and the admin request bodies.

``POST /metrics`` is parsed by ``validation`` (msgspec, item by item); ``MetricsPayload`` here
documents the same shape in OpenAPI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MetricType = Literal[
    "auth_request", "tool_execution", "tool_discovery", "protocol_latency", "custom"
]


class Metric(BaseModel):
    type: MetricType = Field(description="Metric family; decides the typed table and dimensions.")
    value: float = Field(
        1.0,
        description="Event count (>= 0) for auth_request, tool_execution, tool_discovery; "
        "the latency in ms for protocol_latency when duration_ms is absent; any finite number "
        "for custom.",
    )
    duration_ms: float | None = Field(
        None, ge=0, le=86_400_000, description="Duration in milliseconds."
    )
    timestamp: datetime | float | None = Field(
        None,
        description="Event time: ISO 8601 (no offset = UTC) or unix seconds. "
        "Default: receive time.",
    )
    dimensions: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Typed per family; see the README."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form JSON, stored as is."
    )


class MetricsPayload(BaseModel):
    service: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Must match the key's service."
    )
    version: str = Field(max_length=64)
    instance_id: str | None = Field(None, max_length=128)
    metrics: list[Metric] = Field(min_length=1, max_length=1000)


class ItemError(BaseModel):
    index: int | None = None
    field: str
    rule: str
    message: str


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[ItemError]
    request_id: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = []


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str


class RateLimitStatus(BaseModel):
    limit: int
    remaining: int
    reset: int = Field(description="Unix seconds at which a request will pass again.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    role: Literal["ingest", "admin", "viewer"] = "ingest"
    rate_limit_per_min: int | None = Field(None, ge=1, le=10_000_000)
    description: str | None = Field(None, max_length=256)


class KeyInfo(BaseModel):
    id: int
    service: str | None
    role: str
    key_prefix: str
    rate_limit_per_min: int | None
    source: str
    description: str | None
    created_at: int
    revoked_at: int | None
    active: bool


class KeyCreated(KeyInfo):
    key: str = Field(description="The secret. Shown once; only its hash is stored.")


class PolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retention_days: int | None = Field(
        description="Days to keep; null returns the table to METRICS_RETENTION_DAYS.",
        ge=1,
        le=36_500,
    )
    enabled: bool | None = None


class PolicyInfo(BaseModel):
    table: str
    retention_days: int
    is_default: bool
    enabled: bool
