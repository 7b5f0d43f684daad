"""``POST /v1/traces``: MCP spans become the rows posted events make, by the semconv rules;
responses, auth and limits follow OTLP/HTTP and ``/metrics``; on SQLite and PostgreSQL
(``BACKENDS``, tests/conftest.py)."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from metrics_service import Settings, create_app
from tests._helpers import ADMIN_KEY, INGEST_KEY, OTHER_KEY
from tests._servers import stored_rows
from tests._spans import CLIENT, mcp, otlp_json, plain, protobuf, protobuf_resources

#: Spans become the same rows on either backend.
BACKENDS = ("sqlite", "postgresql")

PB = {"Content-Type": "application/x-protobuf", "X-API-Key": INGEST_KEY}
JSON = {"Content-Type": "application/json", "X-API-Key": INGEST_KEY}
TOOL_COLUMNS = (
    "method, tool_name, success, transport, session_id, protocol_version, error_type,"
    " server_name, client_name, trace_id, span_id, duration_ms"
)


def tool_rows(settings: Settings) -> list[tuple[Any, ...]]:
    return stored_rows(settings, f"SELECT {TOOL_COLUMNS} FROM tool_metrics ORDER BY id")


def json_field(text: str | None, name: str) -> Any:
    """``name`` of a JSON column's object (what SQLite's ``json_extract`` gives)."""
    return None if text is None else json.loads(text).get(name)


DIMENSIONS = "SELECT dimensions FROM tool_metrics ORDER BY id"


def response(r: Any) -> ExportTraceServiceResponse:
    assert r.headers["content-type"] == "application/x-protobuf"
    parsed: ExportTraceServiceResponse = ExportTraceServiceResponse.FromString(r.content)
    return parsed


@pytest.fixture
def app_with(make_settings: Callable[..., Settings], keyed_env: None) -> Iterator[Any]:
    """Apps, each on a new database of the test's backend."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> tuple[TestClient, Settings]:
        settings = make_settings(new_database=True, **overrides)
        c = TestClient(create_app(settings))
        c.__enter__()
        clients.append(c)
        return c, settings

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_server_spans_become_tool_rows_by_the_semconv_error_rules(
    client: TestClient, settings: Settings
) -> None:
    spans = [
        mcp("tools/call", "ok"),
        mcp("tools/call", "missing", error_type="-32602"),  # unknown tool: the caller's mistake
        mcp("tools/call", "bad-json", error_type="-32700"),
        mcp("tools/call", "soft", error_type="tool_error"),  # CallToolResult.isError
        mcp("tools/call", "crash", error_type="-32603"),
        mcp("tools/call", "raised", error_type="ValueError"),
        mcp("tools/list"),
        plain(),
    ]
    r = client.post("/v1/traces", content=protobuf(spans), headers=PB)
    assert r.status_code == 200
    assert not response(r).HasField("partial_success")
    rows = tool_rows(settings)
    assert [(row[0], row[1], row[2], row[6]) for row in rows] == [
        ("tools/call", "ok", 1, None),
        ("tools/call", "missing", 1, "-32602"),
        ("tools/call", "bad-json", 1, "-32700"),
        ("tools/call", "soft", 0, "tool_error"),
        ("tools/call", "crash", 0, "-32603"),
        ("tools/call", "raised", 0, "ValueError"),
        ("tools/list", None, 1, None),
    ]
    first = rows[0]
    assert first[3:6] == ("stdio", None, "2025-06-18")
    assert first[7] == "svc"  # a server span's server is the resource's service
    assert (first[9], first[10]) == (spans[0].trace_id, spans[0].span_id)
    assert first[11] == pytest.approx(5.0)


def test_client_spans_count_every_error_code_and_are_marked_client(
    client: TestClient, settings: Settings
) -> None:
    spans = [
        mcp(
            "tools/call",
            "missing",
            error_type="-32602",
            kind=CLIENT,
            extra={"server.address": "weather.local"},
        ),
        mcp(
            "tools/call",
            "ok",
            kind=CLIENT,
            transport="tcp",
            extra={"network.protocol.name": "http"},
        ),
    ]
    assert client.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    rows = tool_rows(settings)
    assert [(r[1], r[2], r[3], r[7], r[8]) for r in rows] == [
        ("missing", 0, "stdio", "weather.local", "svc"),
        ("ok", 1, "streamable-http", None, "svc"),
    ]
    kinds = [json_field(d, "span_kind") for (d,) in stored_rows(settings, DIMENSIONS)]
    assert kinds == ["client", "client"]


def test_json_and_protobuf_give_the_same_rows(app_with: Any) -> None:
    now = time.time_ns() - 10_000_000_000
    spans = [
        mcp("initialize", session="s1", at_ns=now),
        mcp("tools/call", "a", session="s1", at_ns=now + 10**7, error_type="tool_error"),
        mcp(
            "tools/call",
            "b",
            session="s1",
            at_ns=now + 2 * 10**7,
            transport="tcp",
            version="2024-11-05",
        ),
    ]
    pb_client, pb_settings = app_with()
    json_client, json_settings = app_with()
    assert pb_client.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    r = json_client.post("/v1/traces", content=otlp_json(spans), headers=JSON)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {}
    all_columns = (
        "ts, service, service_version, value, duration_ms, "
        + TOOL_COLUMNS
        + ", dimensions, metadata"
    )
    pb_rows = stored_rows(pb_settings, f"SELECT {all_columns} FROM tool_metrics ORDER BY id")
    assert len(pb_rows) == 3 and pb_rows[2][8] == "sse"
    assert pb_rows == stored_rows(
        json_settings, f"SELECT {all_columns} FROM tool_metrics ORDER BY id"
    )
    flows = "SELECT flow_step, duration_ms FROM protocol_latency_metrics ORDER BY id"
    assert (
        stored_rows(pb_settings, flows)
        == stored_rows(json_settings, flows)
        == [("initialize->tools/call", pytest.approx(10.0))]
    )


def test_a_posted_event_with_the_same_fields_is_stored_identically(
    client: TestClient, settings: Settings
) -> None:
    span = mcp("tools/call", "search", error_type="tool_error", session="s9")
    assert (
        client.post(
            "/v1/traces",
            content=protobuf([span], {"service.name": "svc", "service.version": "2.0"}),
            headers=PB,
        ).status_code
        == 200
    )
    event = {
        "type": "tool_execution",
        "timestamp": span.end_ns / 1e9,
        "duration_ms": (span.end_ns - span.start_ns) / 1e6,
        "dimensions": {
            "method": "tools/call",
            "tool_name": "search",
            "success": False,
            "server_name": "svc",
            "transport": "stdio",
            "session_id": "s9",
            "protocol_version": "2025-06-18",
            "error_type": "tool_error",
        },
        "metadata": {"trace_id": span.trace_id, "span_id": span.span_id},
    }
    body = {"service": "svc", "version": "2.0", "metrics": [event]}
    assert (
        client.post("/metrics", json=body, headers={"X-API-Key": INGEST_KEY}).json()["accepted"]
        == 1
    )
    stored = stored_rows(settings, "SELECT * FROM tool_metrics ORDER BY id")
    assert len(stored) == 2
    # Everything but the row id and the receive time.
    assert stored[0][3:] == stored[1][3:]
    assert stored[0][1] == stored[1][1]


def test_flow_latency_once_per_session_across_requests_and_per_trace_without_one(
    client: TestClient, settings: Settings
) -> None:
    t0 = time.time_ns() - 30_000_000_000
    ms = 1_000_000
    first = [
        mcp("initialize", session="A", at_ns=t0),
        mcp("tools/list", session="A", at_ns=t0 + 20 * ms),
    ]
    second = [
        mcp("tools/call", "x", session="A", at_ns=t0 + 50 * ms),
        mcp("tools/call", "x", session="A", at_ns=t0 + 90 * ms),
        mcp("tools/list", session="A", at_ns=t0 + 95 * ms),
        # Sessionless (2026-07-28): one trace is one flow.
        mcp("server/discover", trace_id="ab" * 16, version="2026-07-28", at_ns=t0),
        mcp("tools/call", "y", trace_id="ab" * 16, version="2026-07-28", at_ns=t0 + 7 * ms),
        # A client span never makes flow steps (the server's spans do).
        mcp("initialize", kind=CLIENT, session="B", at_ns=t0),
        mcp("tools/call", "z", kind=CLIENT, session="B", at_ns=t0 + ms),
    ]
    for spans in (first, second):
        assert client.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    rows = [
        (step, round(duration, 3), session, json_field(metadata, "handshake_method"))
        for step, duration, session, metadata in stored_rows(
            settings,
            "SELECT flow_step, duration_ms, session_id, metadata"
            " FROM protocol_latency_metrics ORDER BY id",
        )
    ]
    assert sorted(rows, key=str) == [
        ("initialize->tools/call", 50.0, "A", "initialize"),
        ("initialize->tools/call", 7.0, None, "server/discover"),
        ("initialize->tools/list", 20.0, "A", "initialize"),
        ("tools/list->tools/call", 30.0, "A", "initialize"),
    ]


@pytest.mark.sqlite_only("the refusal comes from SQLite's writer lock, held by another connection")
def test_a_refused_export_derives_its_flow_steps_again_when_retried(app_with: Any) -> None:
    c, settings = app_with(sqlite_busy_timeout_ms=0, commit_retries=0)
    t0 = time.time_ns() - 30_000_000_000
    spans = [
        mcp("initialize", session="R", at_ns=t0),
        mcp("tools/list", session="R", at_ns=t0 + 10**7),
    ]
    # Another process holds the write lock: the commit fails, the export gets 503.
    other = sqlite3.connect(settings.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    r = c.post("/v1/traces", content=protobuf(spans), headers=PB)
    other.execute("ROLLBACK")
    other.close()
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert tool_rows(settings) == []
    # The exporter retries the same request: the same rows and the same flow step, once.
    assert c.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    steps = "SELECT flow_step, round(duration_ms, 3) FROM protocol_latency_metrics"
    assert stored_rows(settings, steps) == [("initialize->tools/list", 10.0)]
    assert len(tool_rows(settings)) == 2


def test_bearer_and_x_api_key_authenticate_and_the_service_is_bound(
    client: TestClient, settings: Settings
) -> None:
    body = protobuf([mcp("tools/call", "t")])
    bearer = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {INGEST_KEY}"}
    assert client.post("/v1/traces", content=body, headers=bearer).status_code == 200
    r = client.post("/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 401 and b"missing API key" in r.content
    r = client.post(
        "/v1/traces", content=body, headers={**bearer, "Authorization": "Bearer nope-nope-nope"}
    )
    assert r.status_code == 401
    wrong = {"Content-Type": "application/x-protobuf", "X-API-Key": OTHER_KEY}
    r = client.post("/v1/traces", content=body, headers=wrong)
    assert r.status_code == 403 and b"'svc'" in r.content
    admin = {"Content-Type": "application/x-protobuf", "X-API-Key": ADMIN_KEY}
    assert client.post("/v1/traces", content=body, headers=admin).status_code == 403
    # No service.name, or the SDK's unknown_service default: the key's service is taken.
    for resource in ({}, {"service.name": "unknown_service:python"}):
        anon = protobuf([mcp("tools/call", "anon")], resource or {"host.name": "h"})
        assert client.post("/v1/traces", content=anon, headers=PB).status_code == 200
    assert stored_rows(settings, "SELECT DISTINCT service FROM tool_metrics") == [("svc",)]
    assert len(tool_rows(settings)) == 3
    # Non-MCP spans of another service in the same request are dropped, not refused.
    mixed = protobuf_resources(
        [({"service.name": "web"}, [plain()]), ({"service.name": "svc"}, [mcp("ping")])]
    )
    assert client.post("/v1/traces", content=mixed, headers=PB).status_code == 200


def test_partial_success_names_the_rule_and_keeps_the_valid_spans(
    client: TestClient, settings: Settings
) -> None:
    spans = [
        mcp("tools/call", "x" * 300),  # longer than METRICS_MAX_STRING_LENGTH
        mcp("tools/call", "fine"),
        mcp("tools/call", "backwards", duration_ms=-1),
        mcp("tools/call", "ancient", at_ns=1_000_000_000),
    ]
    r = client.post("/v1/traces", content=protobuf(spans), headers=PB)
    assert r.status_code == 200
    partial = response(r).partial_success
    assert partial.rejected_spans == 3
    assert "spans[0].dimensions: max_length" in partial.error_message
    assert "spans[2].duration_ms: ge" in partial.error_message
    assert "spans[3].timestamp: older_than_retention" in partial.error_message
    assert [row[1] for row in tool_rows(settings)] == ["fine"]
    r = client.post("/v1/traces", content=otlp_json(spans[:1]), headers=JSON)
    assert r.status_code == 200
    assert r.json()["partialSuccess"]["rejectedSpans"] == "1"


def test_undecodable_bodies_are_400_and_wrong_types_415(client: TestClient) -> None:
    body = protobuf([mcp("tools/call", "t")])
    r = client.post("/v1/traces", content=body[:-7], headers=PB)
    assert r.status_code == 400
    r = client.post("/v1/traces", content=b"{not json", headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    bad_id = otlp_json([mcp("tools/call", "t")]).replace(b'"traceId": "', b'"traceId": "zz')
    r = client.post("/v1/traces", content=bad_id, headers=JSON)
    assert r.status_code == 400 and "traceId" in r.json()["message"]
    r = client.post("/v1/traces", content=body, headers={**PB, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/traces", content=body, headers={**PB, "Content-Encoding": "br"})
    assert r.status_code == 415
    assert client.get("/v1/traces").status_code == 405


def test_gzip_is_inflated_under_the_body_limit(client: TestClient, settings: Settings) -> None:
    body = protobuf([mcp("tools/call", "zipped")])
    r = client.post(
        "/v1/traces", content=gzip.compress(body), headers={**PB, "Content-Encoding": "gzip"}
    )
    assert r.status_code == 200
    assert [row[1] for row in tool_rows(settings)] == ["zipped"]
    bomb = gzip.compress(b"\0" * (settings.max_request_bytes + 1))
    r = client.post("/v1/traces", content=bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 413
    r = client.post(
        "/v1/traces", content=gzip.compress(body)[:-9], headers={**PB, "Content-Encoding": "gzip"}
    )
    assert r.status_code == 400


def test_limits_answer_413_and_429_with_retry_after(app_with: Any) -> None:
    c, _ = app_with(otlp_max_spans_per_request=3, rate_limit_per_min=2)
    r = c.post("/v1/traces", content=protobuf([plain() for _ in range(4)]), headers=PB)
    assert r.status_code == 413 and b"METRICS_OTLP_MAX_SPANS_PER_REQUEST" in r.content
    assert c.post("/v1/traces", content=protobuf([plain()]), headers=PB).status_code == 200
    r = c.post("/v1/traces", content=protobuf([plain()]), headers=PB)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_otlp_metrics_are_refused_with_the_reason(client: TestClient) -> None:
    r = client.post("/v1/metrics", content=b"", headers={**PB, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "otlp_metrics_not_accepted"
    assert "aggregates" in r.json()["message"]


def test_non_mcp_spans_are_counted_never_stored(client: TestClient, settings: Settings) -> None:
    spans = [plain(), plain("SELECT"), mcp("tools/call", "t"), mcp("tools/call", "y" * 999)]
    assert client.post("/v1/traces", content=protobuf(spans), headers=PB).status_code == 200
    assert len(tool_rows(settings)) == 1
    totals = client.app.state.metrics.telemetry.totals["metrics_service_otlp_spans"].values  # type: ignore[attr-defined]
    assert totals == {("not_mcp",): 2, ("accepted",): 1, ("rejected",): 1}


def test_ingest_can_be_switched_off(app_with: Any) -> None:
    c, _ = app_with(otlp_ingest_enabled=False)
    assert c.post("/v1/traces", content=protobuf([plain()]), headers=PB).status_code == 404
