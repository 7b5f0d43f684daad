"""The baselines of ``bench/ingest.py``: bare FastAPI endpoints that parse the body and store
nothing.

- ``app``: the service's own pydantic models (``metrics_service.models.MetricsPayload``).
- ``lean``: the simpler request models of the reference metrics-service (the MCP Gateway
  Registry's), written here from its field list: ``service``, ``version``, ``instance_id`` and
  ``metrics``, each of a ``type`` (one of its seven), ``timestamp``, ``value``, ``duration_ms``,
  ``dimensions`` and ``metadata``, with no limits on sizes, names or labels. ``value`` defaults
  to 1.0 here, as in the service's API, so that both parse every body of the workload (some
  omit it).

    uvicorn bench.baseline_app:app --port 8001
    uvicorn bench.baseline_app:lean --port 8002
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from metrics_service.models import MetricsPayload

app = FastAPI()


@app.post("/metrics")
async def ingest(payload: MetricsPayload) -> dict[str, int]:
    return {"accepted": len(payload.metrics), "rejected": 0}


class LeanType(StrEnum):
    auth_request = "auth_request"
    tool_discovery = "tool_discovery"
    tool_execution = "tool_execution"
    registry_operation = "registry_operation"
    health_check = "health_check"
    protocol_latency = "protocol_latency"
    custom = "custom"


class LeanMetric(BaseModel):
    type: LeanType
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    value: float = 1.0
    duration_ms: float | None = None
    dimensions: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class LeanRequest(BaseModel):
    service: str
    version: str = "1.0.0"
    instance_id: str | None = None
    metrics: list[LeanMetric]


lean = FastAPI()


@lean.post("/metrics")
async def ingest_lean(payload: LeanRequest) -> dict[str, int]:
    return {"accepted": len(payload.metrics), "rejected": 0}
