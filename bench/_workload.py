"""The bench workload: request bodies that mix the four metric families, shared by every bench."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


def metric(i: int, ts: float | None = None) -> dict[str, Any]:
    """The ``i``-th metric of the mix: auth, tool execution, discovery, protocol latency in turn."""
    k = i % 4
    if k == 0:
        m: dict[str, Any] = {
            "type": "auth_request",
            "duration_ms": 5 + i % 50,
            "dimensions": {
                "success": i % 10 != 0,
                "method": "jwt",
                "server": "auth-1",
                "user_hash": f"u{i % 5000}",
            },
        }
    elif k == 1:
        m = {
            "type": "tool_execution",
            "duration_ms": 20 + i % 300,
            "dimensions": {
                "method": "tools/call",
                "tool_name": f"tool-{i % 12}",
                "server_name": "srv",
                "client_name": "claude",
                "success": True,
                "input_size_bytes": 100 + i % 900,
                "output_size_bytes": 2000 + i % 5000,
            },
        }
    elif k == 2:
        m = {
            "type": "tool_discovery",
            "duration_ms": 40,
            "dimensions": {
                "query": f"q{i % 1000}",
                "results_count": i % 10,
                "embedding_time_ms": 12,
                "search_time_ms": 3,
            },
        }
    else:
        m = {
            "type": "protocol_latency",
            "duration_ms": 100 + i % 400,
            "dimensions": {"flow_step": "initialize->tools/list", "server_name": "srv"},
        }
    if ts is not None:
        m["timestamp"] = ts
    return m


def bodies(
    n_requests: int, batch: int, service: str = "svc", ts: float | None = None
) -> list[bytes]:
    """``n_requests`` JSON bodies of ``batch`` metrics each; ``ts`` (unix s) pins event times."""
    ts = time.time() if ts is None else ts
    return [
        json.dumps(
            {
                "service": service,
                "version": "1.0.0",
                "metrics": [metric(r * batch + i, ts) for i in range(batch)],
            }
        ).encode()
        for r in range(n_requests)
    ]


def free_port() -> int:
    """A port that was free a moment ago, for the service a bench starts (the benches run alone,
    not beside other suites; tests/_ports.py has the race-free way for the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
