"""Pydantic models at the HTTP boundary: the OpenAPI schema and the admin request bodies.

``POST /metrics`` is parsed by ``validation`` (msgspec, item by item); ``MetricsPayload`` here
documents the same shape in OpenAPI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MetricType = Literal[
    "auth_request",
    "tool_execution",
    "tool_discovery",
    "protocol_latency",
    "registry_operation",
    "health_check",
    "custom",
]


class Metric(BaseModel):
    type: MetricType = Field(description="Metric family; decides the typed table and dimensions.")
    value: float = Field(
        1.0,
        description="Event count (>= 0) for every type but these two: for protocol_latency "
        "without duration_ms, the latency in seconds (as the MCP Gateway Registry sends it); "
        "for custom, any finite number.",
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
    version: str | None = Field(None, max_length=64)
    instance_id: str | None = Field(None, max_length=128)
    metrics: list[Metric] = Field(min_length=1, max_length=1000)


class ItemError(BaseModel):
    index: int | None = None
    field: str
    rule: str
    message: str


class IngestResult(BaseModel):
    status: str = Field("success", description="success (200) or error (422: none stored).")
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
    detail: str = Field(description="The same as error.message (where FastAPI clients look).")
    request_id: str


class RateLimitStatus(BaseModel):
    limit: int
    remaining: int
    reset: int = Field(description="Unix seconds at which a request will pass again.")
    service: str | None = Field(description="The key's service (null for admin/viewer keys).")
    rate_limit: int = Field(description="The same as limit.")
    available_tokens: int = Field(description="The same as remaining.")
    reset_time_seconds: int = Field(description="Seconds until reset.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    role: Literal["ingest", "admin", "viewer"] = "ingest"
    rate_limit_per_min: int | None = Field(None, ge=1, le=10_000_000)
    # No U+0000: PostgreSQL's text cannot hold it (refused on every backend alike).
    description: str | None = Field(None, max_length=256, pattern=r"^[^\x00]*$")
    aliases: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]] = Field(
        default_factory=list,
        max_length=16,
        description="Further service names this ingest key may report as.",
    )


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
    aliases: list[str] = []


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
    is_active: bool | None = Field(None, description="The same as enabled (reference name).")


class PolicyInfo(BaseModel):
    table: str
    retention_days: int
    is_default: bool
    enabled: bool
    table_name: str
    is_active: bool
