"""What the MCP Gateway Registry's metrics clients send (ascending-llc/mcp-gateway-registry at
1472e9c1), written here from the shapes of their payloads: the auth server's middleware
(``auth_server/metrics_middleware.py``), the registry's client and middleware
(``registry/metrics/``), the standalone ``metrics-service/metrics_client.py`` and the examples of
``metrics-service/docs/api-reference.md``. Each builder returns one request body exactly as that
client posts it (``datetime.utcnow().isoformat()`` timestamps: naive ISO, UTC).

``EXPECTED`` says, per body, which typed table every metric lands in and the columns it must
fill, so the tests check rows, not only status codes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

#: The reference's docker-compose registers these services for its keys...
COMPOSE_KEY_SERVICES = {"METRICS_API_KEY_AUTH": "auth", "METRICS_API_KEY_REGISTRY": "registry"}
#: ...while its clients post these names (auth_server: "auth-server"; registry: "registry").
AUTH_SERVICE = "auth-server"
REGISTRY_SERVICE = "registry"
#: The one setting a reference deployment adds (docs/migrating.md).
ALIASES = "auth:auth-server"

AUTH_KEY = "mcp_metrics_auth-0123456789abcdefghijklmnopqrstuv"
REGISTRY_KEY = "mcp_metrics_registry-0123456789abcdefghijklmnopqr"


def utcnow_iso() -> str:
    """``datetime.utcnow().isoformat()``: naive, UTC."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


def user_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:12]


def _body(service: str, metrics: list[dict[str, Any]], **head: Any) -> dict[str, Any]:
    return {"service": service, "version": "1.0.0", **head, "metrics": metrics}


# -- auth_server/metrics_middleware.py: one POST per metric, protocol latencies batched ---------


def auth_server_auth(success: bool = True, server: str = "currenttime") -> dict[str, Any]:
    return _body(
        AUTH_SERVICE,
        [
            {
                "type": "auth_request",
                "timestamp": utcnow_iso(),
                "value": 1.0,
                "duration_ms": 14.01,
                "dimensions": {
                    "success": success,
                    "method": "keycloak" if success else "unknown",
                    "server": server,
                    "user_hash": user_hash("alice") if success else "",
                },
                "metadata": {
                    "error_code": None if success else "403",
                    "request_id": "req_0123456789abcdef",
                },
            }
        ],
    )


def auth_server_tool(
    method: str, tool: str | None = None, success: bool = True, server: str = "currenttime"
) -> dict[str, Any]:
    """A tool_execution for any MCP method seen at /validate: tool_name is the tool for
    tools/call, else the method itself."""
    params: dict[str, Any] = {"name": tool, "arguments": {"tz": "UTC"}} if tool else {}
    return _body(
        AUTH_SERVICE,
        [
            {
                "type": "tool_execution",
                "timestamp": utcnow_iso(),
                "value": 1.0,
                "duration_ms": 9.5,
                "dimensions": {
                    "tool_name": tool or method,
                    "server_name": server,
                    "success": success,
                    "method": method,
                    "user_hash": user_hash("alice"),
                    "server_path": f"/{server}/",
                    "client_name": "claude-code",
                    "client_version": "1.0.98",
                },
                "metadata": {
                    "error_code": None if success else "500",
                    "auth_method": "keycloak",
                    "request_id": "req_0123456789abcdef",
                    "protocol_version": "2025-06-18" if method == "initialize" else None,
                    "jsonrpc_id": 3,
                    "actual_tool_name": tool,
                    "method_type": method,
                    "input_size_bytes": len(json.dumps(params).encode()),
                    "output_size_bytes": 0,
                },
            }
        ],
    )


def auth_server_protocol_latency(
    init_to_list_s: float = 0.25, list_to_call_s: float = 1.5, server: str = "currenttime"
) -> dict[str, Any]:
    """The three flow steps in one body; latency in seconds in value, no duration_ms."""
    steps = (
        ("initialize_to_tools_list", init_to_list_s, "initialize", "tools/list"),
        ("tools_list_to_tools_call", list_to_call_s, "tools/list", "tools/call"),
        ("full_protocol_flow", init_to_list_s + list_to_call_s, "initialize", "tools/call"),
    )
    return _body(
        AUTH_SERVICE,
        [
            {
                "type": "protocol_latency",
                "timestamp": utcnow_iso(),
                "value": seconds,
                "dimensions": {
                    "flow_step": step,
                    "server_name": server,
                    "user_hash": user_hash("alice"),
                    "session_key": f"{server}:{user_hash('alice')}",
                },
                "metadata": {
                    "request_id": "req_0123456789abcdef",
                    "latency_seconds": seconds,
                    "from_method": a,
                    "to_method": b,
                },
            }
            for step, seconds, a, b in steps
        ],
    )


# -- registry/metrics/client.py and middleware.py ----------------------------------------------


def _registry_metric(
    kind: str,
    value: float,
    duration_ms: float | None,
    dimensions: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": kind,
        "timestamp": utcnow_iso(),
        "value": value,
        "duration_ms": duration_ms,
        "dimensions": dimensions,
        "metadata": metadata or {},
    }


def registry_operation(
    operation: str = "list",
    resource_type: str = "server",
    success: bool = True,
    resource_id: str = "",
    service: str = REGISTRY_SERVICE,
) -> dict[str, Any]:
    return _body(
        service,
        [
            _registry_metric(
                "registry_operation",
                1.0,
                4.2,
                {
                    "operation": operation,
                    "resource_type": resource_type,
                    "success": success,
                    "resource_id": resource_id,
                    "user_id": user_hash("bob"),
                },
                {"error_code": None if success else "404"},
            )
        ],
    )


def registry_search_discovery(query: str = "weather") -> dict[str, Any]:
    """The middleware's discovery metric for /api/search: results_count -1 ("not available")."""
    return _body(
        REGISTRY_SERVICE,
        [
            _registry_metric(
                "tool_discovery",
                1.0,
                33.0,
                {"query": query, "results_count": -1, "top_k_services": None, "top_n_tools": None},
                {"embedding_time_ms": None, "faiss_search_time_ms": None},
            )
        ],
    )


def registry_tool_discovery_tracker(server: str = "currenttime", tools: int = 3) -> list[Any]:
    """``track_tool_discovery``: two posts, a discovery and a tools/list tool_execution without
    ``method``."""
    url = f"http://mcpgw:8000/{server}/"
    return [
        _body(
            REGISTRY_SERVICE,
            [
                _registry_metric(
                    "tool_discovery",
                    1.0,
                    21.5,
                    {
                        "query": f"tools_from_{server}",
                        "results_count": tools,
                        "top_k_services": None,
                        "top_n_tools": None,
                    },
                    {"embedding_time_ms": None, "faiss_search_time_ms": None},
                )
            ],
        ),
        _body(
            REGISTRY_SERVICE,
            [
                _registry_metric(
                    "tool_execution",
                    1.0,
                    21.5,
                    {
                        "tool_name": "tools/list",
                        "server_path": url,
                        "server_name": server,
                        "success": True,
                    },
                    {
                        "error_code": None,
                        "input_size_bytes": None,
                        "output_size_bytes": tools * 100,
                    },
                )
            ],
        ),
    ]


def registry_health_check(server: str = "currenttime", healthy: bool = True) -> dict[str, Any]:
    return _body(
        REGISTRY_SERVICE,
        [
            _registry_metric(
                "health_check",
                1.0,
                7.75,
                {
                    "endpoint": f"/health/{server}",
                    "status_code": 200 if healthy else 500,
                    "healthy": healthy,
                },
            )
        ],
    )


def registry_headers_analysis() -> dict[str, Any]:
    return _body(
        REGISTRY_SERVICE,
        [
            _registry_metric(
                "custom",
                1.0,
                None,
                {
                    "metric_name": "request_headers_analysis",
                    "path": "/api/servers",
                    "method": "GET",
                    "status_code": 200,
                    "has_auth": True,
                    "user_agent_type": "python_client",
                    "content_type": "unknown",
                    "has_origin": False,
                },
                {"headers_sample": "{'user_agent_type': 'python_client'}"},
            )
        ],
    )


# -- metrics-service/metrics_client.py (instance_id "<service>-<pid>") --------------------------


def standalone_client_batch(service: str = "mcpgw") -> dict[str, Any]:
    """``emit_metrics_batch`` with one metric of every helper's shape."""
    metrics = [
        _registry_metric(
            "auth_request",
            1.0,
            12.0,
            {"success": False, "method": "jwt", "server": "unknown", "user_hash": ""},
            {"error_code": 401},
        ),
        _registry_metric(
            "tool_execution",
            1.0,
            80.0,
            {
                "tool_name": "intelligent_tool_finder",
                "server_path": "/mcpgw/",
                "server_name": "mcpgw",
                "success": False,
            },
            {"error_code": "TimeoutError", "input_size_bytes": 64, "output_size_bytes": 2048},
        ),
        _registry_metric(
            "tool_discovery",
            1.0,
            125.7,
            {
                "query": "file operations",
                "results_count": 15,
                "top_k_services": 5,
                "top_n_tools": 10,
            },
            {"embedding_time_ms": 12.3, "faiss_search_time_ms": 8.9},
        ),
        registry_operation("create", "server", resource_id="srv-1", service=service)["metrics"][0],
        registry_health_check("mcpgw", healthy=False)["metrics"][0],
        _registry_metric("custom", 42.0, None, {"metric_name": "queue_depth"}, {}),
    ]
    return _body(service, metrics, instance_id=f"{service}-4242")


# -- metrics-service/docs/api-reference.md examples (timestamps moved to now) -------------------


def docs_examples() -> list[dict[str, Any]]:
    return [
        {
            "service": "auth-server",
            "version": "1.0.0",
            "instance_id": "auth-01",
            "metrics": [
                {
                    "type": "auth_request",
                    "value": 1.0,
                    "duration_ms": 45.2,
                    "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "dimensions": {
                        "method": "jwt",
                        "success": True,
                        "server": "auth-01",
                        "user_hash": "user_abc123",
                    },
                    "metadata": {"error_code": None, "request_size": 1024, "response_size": 512},
                }
            ],
        },
        {
            "service": "registry-service",
            "version": "2.1.0",
            "metrics": [
                {
                    "type": "tool_discovery",
                    "value": 1.0,
                    "duration_ms": 125.7,
                    "dimensions": {
                        "query": "file operations",
                        "results_count": 15,
                        "top_k_services": 5,
                        "top_n_tools": 10,
                    },
                    "metadata": {
                        "embedding_time_ms": 12.3,
                        "faiss_search_time_ms": 8.9,
                        "cache_hit": False,
                    },
                }
            ],
        },
        {
            "service": "mcpgw-server",
            "version": "1.0.0",
            "instance_id": "mcpgw-01",
            "metrics": [
                {
                    "type": "tool_execution",
                    "value": 1.0,
                    "duration_ms": 1250.5,
                    "dimensions": {
                        "tool_name": "file_reader",
                        "server_path": "/tools/file/read",
                        "server_name": "file-server",
                        "success": True,
                    },
                    "metadata": {
                        "error_code": None,
                        "input_size_bytes": 256,
                        "output_size_bytes": 1024,
                        "tool_version": "1.2.0",
                    },
                }
            ],
        },
        {
            "service": "multi-service",
            "version": "1.0.0",
            "metrics": [
                {
                    "type": "auth_request",
                    "value": 1.0,
                    "duration_ms": 45.2,
                    "dimensions": {"method": "jwt", "success": True},
                },
                {
                    "type": "tool_discovery",
                    "value": 1.0,
                    "duration_ms": 125.7,
                    "dimensions": {"query": "search tools", "results_count": 10},
                },
                {
                    "type": "tool_execution",
                    "value": 1.0,
                    "duration_ms": 890.3,
                    "dimensions": {"tool_name": "calculator", "success": True},
                },
            ],
        },
    ]


#: Every body a reference client or doc produces, by name (one body each, lists flattened).
def all_bodies() -> dict[str, dict[str, Any]]:
    builders: dict[str, Callable[[], Any]] = {
        "auth_ok": auth_server_auth,
        "auth_denied": lambda: auth_server_auth(success=False),
        "tool_initialize": lambda: auth_server_tool("initialize"),
        "tool_list": lambda: auth_server_tool("tools/list"),
        "tool_call": lambda: auth_server_tool("tools/call", "current_time_by_timezone"),
        "tool_call_failed": lambda: auth_server_tool("tools/call", "boom", success=False),
        "protocol_flow": auth_server_protocol_latency,
        "registry_list": registry_operation,
        "registry_read_missing": lambda: registry_operation("read", "server", False, "nope"),
        "registry_search": registry_search_discovery,
        "registry_health": registry_health_check,
        "registry_unhealthy": lambda: registry_health_check("atlassian", healthy=False),
        "registry_headers": registry_headers_analysis,
        "standalone_batch": standalone_client_batch,
    }
    out: dict[str, dict[str, Any]] = {}
    for name, build in builders.items():
        out[name] = build()
    for i, body in enumerate(registry_tool_discovery_tracker()):
        out[f"tracker_{i}"] = body
    for i, body in enumerate(docs_examples()):
        out[f"docs_{i}"] = body
    return out


def metric_count(bodies: dict[str, dict[str, Any]]) -> int:
    return sum(len(b["metrics"]) for b in bodies.values())
