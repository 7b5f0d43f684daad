"""The OpenTelemetry MCP semantic-convention histograms: names (Prometheus translation and OTLP
dotted), advised buckets, attributes by the conventions' rules, the switches of both name sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.telemetry import SEMCONV_BUCKETS
from tests._helpers import ADMIN_KEY, INGEST_KEY, tool_event, wait_for
from tests._otlp import OtlpReceiver
from tests._prometheus import parse_samples
from tests._spans import CLIENT, mcp, protobuf

PB = {"Content-Type": "application/x-protobuf", "X-API-Key": INGEST_KEY}
SERVER = "mcp_server_operation_duration_seconds"
CLIENT_OP = "mcp_client_operation_duration_seconds"


def scrape(c: TestClient) -> dict[Any, float]:
    port = c.app.state.metrics.telemetry.prometheus_port  # type: ignore[attr-defined]
    return parse_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def series(samples: dict[Any, float], name: str) -> list[dict[str, str]]:
    """Label sets of ``name`` (labels with an empty value are absent, as in Prometheus)."""
    return [{k: v for k, v in labels if v != ""} for (n, labels), _ in samples.items() if n == name]


@pytest.fixture
def make(tmp_path: Path, keyed_env: None) -> Iterator[Any]:
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        settings = Settings(
            db_path=tmp_path / f"m{len(clients)}.db", admin_api_key=ADMIN_KEY, **overrides
        )
        c = TestClient(create_app(settings))
        c.__enter__()
        clients.append(c)
        return c

    yield build
    for c in clients:
        c.__exit__(None, None, None)


def send(c: TestClient) -> None:
    spans = [
        mcp("tools/call", "ok", duration_ms=30, session="secret-session"),
        mcp("tools/call", "missing", error_type="-32602"),  # the caller's mistake: no error.type
        mcp("tools/call", "soft", error_type="tool_error", transport="tcp"),
        mcp("tools/list", duration_ms=150),
        mcp("tools/call", "ok", kind=CLIENT, error_type="-32602", duration_ms=400),
    ]
    assert c.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    body = {"service": "svc", "version": "1", "metrics": [tool_event("posted", success=False)]}
    assert c.post("/metrics", json=body, headers={"X-API-Key": INGEST_KEY}).status_code == 200


def test_the_histograms_carry_the_conventions_attributes_and_buckets(make: Any) -> None:
    c = make()
    send(c)
    samples = scrape(c)
    counts = {
        frozenset(s.items()): v
        for s, v in zip(
            series(samples, f"{SERVER}_count"),
            [v for (n, _), v in samples.items() if n == f"{SERVER}_count"],
            strict=True,
        )
    }
    tool = {
        "service": "svc",
        "mcp_method_name": "tools/call",
        "gen_ai_operation_name": "execute_tool",
    }
    stdio = {"network_transport": "pipe", "mcp_protocol_version": "2025-06-18"}
    assert counts == {
        frozenset({**tool, **stdio, "gen_ai_tool_name": "ok"}.items()): 1,
        frozenset(
            {
                **tool,
                **stdio,
                "gen_ai_tool_name": "missing",
                "rpc_response_status_code": "-32602",
            }.items()
        ): 1,
        frozenset(
            {
                **tool,
                "network_transport": "tcp",
                "mcp_protocol_version": "2025-06-18",
                "gen_ai_tool_name": "soft",
                "error_type": "tool_error",
            }.items()
        ): 1,
        # tools/list: no tool, no execute_tool.
        frozenset({"service": "svc", "mcp_method_name": "tools/list", **stdio}.items()): 1,
        # A posted failure with no error type: error.type's fallback value.
        frozenset(
            {
                **tool,
                "gen_ai_tool_name": "posted",
                "error_type": "_OTHER",
            }.items()
        ): 1,
    }
    # The client side counts every JSON-RPC error.
    [client] = series(samples, f"{CLIENT_OP}_count")
    assert client["error_type"] == "-32602" and client["gen_ai_tool_name"] == "ok"
    # The advised boundaries, in seconds; a 30 ms call lands in the 0.05 bucket.
    bounds = sorted(
        {float(dict(labels)["le"]) for (n, labels) in samples if n == f"{SERVER}_bucket"}
    )
    assert bounds == [*SEMCONV_BUCKETS, float("inf")]
    ok = {
        k: v
        for (n, labels), v in samples.items()
        if n == f"{SERVER}_bucket" and ("gen_ai_tool_name", "ok") in labels
        for k in [dict(labels)["le"]]
    }
    assert ok["0.02"] == 0 and ok["0.05"] == 1
    # Never a session or request id.
    assert not any(
        "session" in k or "request" in k for s in series(samples, f"{SERVER}_count") for k in s
    )


@pytest.mark.parametrize("switch", ["seed", "semconv"])
def test_either_name_set_can_be_switched_off(make: Any, switch: str) -> None:
    c = make(**{f"otel_{switch}_metrics_enabled": False})
    send(c)
    names = {n for n, _ in scrape(c)}
    assert (f"{SERVER}_count" in names) == (switch == "seed")
    assert ("mcp_tool_executions_total" in names) == (switch == "semconv")
    assert "metrics_service_metrics_accepted_total" in names  # the self-metrics stay


def test_over_otlp_the_names_and_attributes_are_dotted(make: Any) -> None:
    with OtlpReceiver() as receiver:
        c = make(otlp_endpoint=receiver.url, otel_export_interval_ms=200)
        send(c)
        points = wait_for(
            lambda: (
                sum(
                    p.point.count for p in receiver.latest("mcp.server.operation.duration").values()
                )
                == 5
                and receiver.latest("mcp.server.operation.duration")
            ),
            20,
        )
        point = next(p for p in points.values() if p.attributes.get("gen_ai.tool.name") == "soft")
        assert point.metric.unit == "s"
        assert point.attributes["error.type"] == "tool_error"
        assert point.attributes["mcp.method.name"] == "tools/call"
        assert list(point.point.explicit_bounds) == list(SEMCONV_BUCKETS)
        assert receiver.latest("mcp.client.operation.duration")
