"""A small seeded history for the analytics tests, with its exact answers computed here."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from metrics_service.settings import Settings
from metrics_service.storage import rollups
from metrics_service.validation import Validator

TOOLS = ("search", "fetch", "write")
CLIENTS = ("claude", "cursor")
TENANTS = ("acme", "globex")


@dataclass
class Seed:
    now: float
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def tools(self, **where: Any) -> list[dict[str, Any]]:
        out = []
        for m in self.metrics:
            if m["type"] != "tool_execution":
                continue
            d, meta = m["dimensions"], m.get("metadata", {})
            fields = {**d, **meta, "service": "svc"}
            if all(fields.get(k) == v for k, v in where.items()):
                out.append(m)
        return out

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m["type"] == kind]


def make_seed(n: int = 600, days: float = 3.0, seed: int = 7, now: float | None = None) -> Seed:
    rng = random.Random(seed)
    now = time.time() if now is None else now
    s = Seed(now)
    for _ in range(n):
        ts = now - 60 - rng.random() * days * 86_400
        r = rng.random()
        if r < 0.55:
            tool = rng.choice(TOOLS)
            meta: dict[str, Any] = {
                "tenant_id": rng.choice(TENANTS),
                "agent_id": rng.choice(("a1", "a2")),
            }
            if rng.random() < 0.8:
                meta["input_tokens"] = rng.randrange(1, 500)
                meta["output_tokens"] = rng.randrange(1, 2000)
            m: dict[str, Any] = {
                "type": "tool_execution",
                "timestamp": ts,
                "duration_ms": round(rng.lognormvariate(3.5, 1.2), 3),
                "dimensions": {
                    "method": "tools/call",
                    "tool_name": tool,
                    "server_name": f"srv-{TOOLS.index(tool) % 2}",
                    "client_name": rng.choice(CLIENTS),
                    "success": rng.random() < 0.88,
                },
                "metadata": meta,
            }
        elif r < 0.8:
            m = {
                "type": "auth_request",
                "timestamp": ts,
                "duration_ms": round(rng.uniform(1, 80), 3),
                "dimensions": {
                    "success": rng.random() < 0.9,
                    "method": rng.choice(("jwt", "oauth")),
                    "server": "auth-1",
                    "user_hash": f"u{rng.randrange(20)}",
                },
            }
        elif r < 0.9:
            m = {
                "type": "tool_discovery",
                "timestamp": ts,
                "duration_ms": round(rng.uniform(10, 90), 3),
                "dimensions": {
                    "results_count": rng.randrange(0, 10),
                    "embedding_time_ms": round(rng.uniform(2, 40), 3),
                    "search_time_ms": round(rng.uniform(1, 20), 3),
                },
            }
        else:
            m = {
                "type": "protocol_latency",
                "timestamp": ts,
                "duration_ms": round(rng.uniform(5, 900), 3),
                "dimensions": {
                    "flow_step": rng.choice(("initialize->tools/list", "tools/list->tools/call")),
                    "server_name": "srv-0",
                },
            }
        s.metrics.append(m)
    return s


def handshakes(now: float, n: int = 60) -> list[dict[str, Any]]:
    """MCP requests that are not tool calls (initialize, tools/list, server/discover), as the
    middleware reports them, one in four failing."""
    return [
        {
            "type": "tool_execution",
            "timestamp": now - 120 - i * 3_000,
            "duration_ms": 2.0 + i,
            "dimensions": {
                "method": ("initialize", "tools/list", "server/discover")[i % 3],
                "server_name": "srv-0",
                "client_name": "claude",
                "success": i % 4 != 0,
            },
            "metadata": {"tenant_id": "acme"},
        }
        for i in range(n)
    ]


def registry_events(now: float, n: int = 40) -> list[dict[str, Any]]:
    """Registry operations and health checks over three days, as the MCP Gateway Registry's
    middleware sends them (no ``method``, error codes in metadata); one in five failing."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        ts = now - 90 - i * 6_500
        ok = i % 5 != 0
        out.append(
            {
                "type": "registry_operation",
                "timestamp": ts,
                "value": 1.0,
                "duration_ms": 3.0 + i * 1.5,
                "dimensions": {
                    "operation": ("list", "read", "search", "create")[i % 4],
                    "resource_type": ("server", "server", "search", "server")[i % 4],
                    "success": ok,
                    "resource_id": "" if i % 4 == 0 else f"srv-{i % 3}",
                    "user_id": f"u{i % 6}",
                },
                "metadata": {"error_code": None if ok else "500"},
            }
        )
        out.append(
            {
                "type": "health_check",
                "timestamp": ts - 30,
                "value": 1.0,
                "duration_ms": 1.0 + i,
                "dimensions": {
                    "endpoint": f"/health/srv-{i % 3}",
                    "status_code": 200 if ok else 500,
                    "healthy": ok,
                },
            }
        )
    return out


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def assert_same_bucket(estimate: float | None, values: list[float], q: float) -> None:
    """The estimate lies inside the latency bucket that holds the exact (nearest-rank) value."""
    exact = exact_percentile(values, q)
    b = rollups.bucket_of(exact)
    low = rollups.BOUNDS_MS[b - 1] if b else 0.0
    high = rollups.BOUNDS_MS[b] if b < len(rollups.BOUNDS_MS) else math.inf
    assert estimate is not None and low <= estimate <= high, (q, estimate, exact, low, high)


def post_seed(client: Any, seed: Seed, headers: dict[str, str], batch: int = 250) -> None:
    for i in range(0, len(seed.metrics), batch):
        body = {"service": "svc", "version": "1.0.0", "metrics": seed.metrics[i : i + batch]}
        r = client.post("/metrics", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["rejected"] == 0, r.text


def seed_rows(
    settings: Settings, n: int = 500, registry: bool = True
) -> tuple[float, list[dict[str, list[tuple[Any, ...]]]]]:
    """Rows of a seeded history; ``registry``: with the families of migration 5 (an older
    schema has no table for them)."""
    seed = make_seed(n)
    # Some events without optional dimensions or durations: NULLs must round-trip through keys.
    seed.metrics += [
        {
            "type": "tool_execution",
            "timestamp": seed.now - 3600,
            "dimensions": {"method": "tools/list", "success": True},
        },
        {"type": "auth_request", "timestamp": seed.now - 7200, "dimensions": {"success": False}},
        *(registry_events(seed.now) if registry else ()),
    ]
    validator = Validator(settings)
    parts = []
    for i in range(0, len(seed.metrics), 100):
        body = {"service": "svc", "version": "1", "metrics": seed.metrics[i : i + 100]}
        batch = validator.decode(json.dumps(body).encode())
        assert not batch.rejections
        parts.append(batch.rows)
    return seed.now, parts
