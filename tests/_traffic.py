"""Known traffic for the telemetry tests: one builder per metric family, with every dimension that
becomes a label (and some that must not), and batched posting that checks every item was stored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from tests._helpers import INGEST_KEY, payload

H = {"X-API-Key": INGEST_KEY}


def auth(
    success: bool = True,
    method: str = "jwt",
    server: str = "auth-1",
    duration_ms: float | None = 12.5,
    user_hash: str = "u-1",
    value: float = 1,
    **extra: Any,
) -> dict[str, Any]:
    dims = {"success": success, "method": method, "server": server, "user_hash": user_hash}
    return {
        "type": "auth_request",
        "value": value,
        "duration_ms": duration_ms,
        "dimensions": dims,
        **extra,
    }


def tool(
    tool_name: str | None = "search",
    method: str = "tools/call",
    server: str = "srv",
    client: str = "claude",
    success: bool = True,
    duration_ms: float = 30.0,
    input_size: int = 120,
    output_size: int = 2048,
    session_id: str = "sess-1",
) -> dict[str, Any]:
    dims: dict[str, Any] = {
        "method": method,
        "server_name": server,
        "client_name": client,
        "client_version": "1.2",
        "success": success,
        "input_size_bytes": input_size,
        "output_size_bytes": output_size,
        "session_id": session_id,
        "transport": "stdio",
    }
    if tool_name is not None:
        dims["tool_name"] = tool_name
    return {"type": "tool_execution", "value": 1, "duration_ms": duration_ms, "dimensions": dims}


def discovery(
    query: str = "find files",
    results: int = 7,
    duration_ms: float = 20.0,
    embedding_ms: float = 12.0,
    search_ms: float = 3.0,
) -> dict[str, Any]:
    dims = {
        "query": query,
        "results_count": results,
        "top_k": 10,
        "embedding_time_ms": embedding_ms,
        "search_time_ms": search_ms,
    }
    return {"type": "tool_discovery", "value": 1, "duration_ms": duration_ms, "dimensions": dims}


def protocol(
    flow_step: str = "initialize->tools/list",
    duration_ms: float = 15.0,
    server: str = "srv",
    client: str = "claude",
    session_id: str = "sess-1",
) -> dict[str, Any]:
    dims = {
        "flow_step": flow_step,
        "server_name": server,
        "client_name": client,
        "session_id": session_id,
    }
    return {"type": "protocol_latency", "duration_ms": duration_ms, "dimensions": dims}


def health(
    server: str = "srv",
    healthy: bool = True,
    status_code: int | None = 200,
    duration_ms: float | None = 7.5,
    value: float = 1,
) -> dict[str, Any]:
    """A health check of an MCP server as the registry sends it (``endpoint``, ``status_code``,
    ``healthy``), with our ``server_name``."""
    dims: dict[str, Any] = {"endpoint": f"/health/{server}", "healthy": healthy}
    dims["server_name"] = server
    if status_code is not None:
        dims["status_code"] = status_code
    return {"type": "health_check", "value": value, "duration_ms": duration_ms, "dimensions": dims}


def post_all(client: httpx.Client, metrics: Sequence[dict[str, Any]], batch: int = 1000) -> None:
    """Post ``metrics`` in batches (the API takes at most 1000 per request); each must be stored."""
    for i in range(0, len(metrics), batch):
        chunk = list(metrics[i : i + batch])
        r = client.post("/metrics", json=payload(metrics=chunk), headers=H)
        assert r.status_code == 200 and r.json()["accepted"] == len(chunk), (
            r.status_code,
            r.text[:500],
        )
