"""Hostile OTLP on ``POST /v1/traces``: truncated and random protobuf, wrong content types, a gzip
bomb, 100k spans in one request, 1 MB attribute values, 100k distinct tool names. Never a 5xx,
and every span acknowledged is stored (and nothing else)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from metrics_service import Settings, create_app
from tests._helpers import ADMIN_KEY, INGEST_KEY, db_rows
from tests._prometheus import parse_samples
from tests._spans import bulk, mcp, plain, protobuf

PB = {"Content-Type": "application/x-protobuf", "X-API-Key": INGEST_KEY}
MB = 1024 * 1024


@pytest.fixture
def big(tmp_path: Path, keyed_env: None) -> Iterator[tuple[TestClient, Settings]]:
    """A service that takes large requests: 64 MiB bodies, 100k spans and rows per request."""
    config = Settings(
        db_path=tmp_path / "big.db",
        admin_api_key=ADMIN_KEY,
        max_request_bytes=64 * MB,
        otlp_max_spans_per_request=100_000,
        queue_max_metrics=200_000,
        commit_max_rows=200_000,
        rate_limit_per_min=1_000_000,
        otel_cardinality_limit=100,
    )
    with TestClient(create_app(config)) as c:
        yield c, config


def count(config: Settings, table: str = "tool_metrics") -> int:
    return int(db_rows(config.db_path, f"SELECT count(*) FROM {table}")[0][0])


def mcp_spans_in(body: bytes) -> int | None:
    """How many MCP spans a protobuf body holds, decoded as any OTLP receiver would."""
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except DecodeError:
        return None
    return sum(
        1
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
        if any(kv.key == "mcp.method.name" for kv in s.attributes)
    )


def test_every_truncation_of_a_request_is_400_or_what_it_decodes_to(
    big: tuple[TestClient, Settings],
) -> None:
    client, config = big
    body = protobuf([mcp("tools/call", f"t{i}", session="s") for i in range(12)] + [plain()])
    acknowledged = 0
    for cut in range(0, len(body), 3):
        prefix = body[:cut]
        r = client.post("/v1/traces", content=prefix, headers=PB)
        decodable = mcp_spans_in(prefix)
        if decodable is None:
            assert r.status_code == 400, (cut, r.status_code)
        else:
            # A cut on a field boundary is a shorter valid message: its spans are stored.
            assert r.status_code == 200, (cut, r.status_code, r.content)
            rejected = ExportTraceServiceResponse.FromString(r.content).partial_success
            acknowledged += decodable - rejected.rejected_spans
    assert count(config) == acknowledged


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=512))
def test_random_bytes_are_never_a_5xx(big: tuple[TestClient, Settings], junk: bytes) -> None:
    client, _ = big
    for content_type in ("application/x-protobuf", "application/json"):
        r = client.post("/v1/traces", content=junk, headers={**PB, "Content-Type": content_type})
        assert r.status_code in (200, 400), (junk, r.status_code, r.content)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/grpc", "application/protobuf", "multipart/form-data"],
)
def test_wrong_content_types_are_415(client: TestClient, content_type: str | None) -> None:
    headers = {"X-API-Key": INGEST_KEY}
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = client.post("/v1/traces", content=protobuf([mcp("tools/call", "t")]), headers=headers)
    assert r.status_code == 415 and b"application/x-protobuf" in r.content


def test_a_gzip_bomb_is_refused_without_inflating_it(
    client: TestClient, settings: Settings
) -> None:
    bomb = gzip.compress(b"\0" * (64 * MB), compresslevel=9)  # 64 KB on the wire
    assert len(bomb) < settings.max_request_bytes
    # Inflated at most to the body limit (zlib's max_length), then refused.
    r = client.post("/v1/traces", content=bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 413 and b"decompressed" in r.content
    assert count(settings) == 0


def test_100k_spans_with_100k_tool_names_in_one_request(
    big: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    c, config = big
    body = bulk(100_000)
    r = c.post("/v1/traces", content=body, headers=PB)
    assert r.status_code == 200, r.content[:300]
    assert not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
    assert db_rows(
        config.db_path,
        "SELECT count(*), count(DISTINCT span_id), count(DISTINCT tool_name) FROM tool_metrics",
    ) == [(100_000, 100_000, 100_000)]
    # Every row is stored; the export keeps at most the cardinality limit of label sets.
    telemetry: Any = c.app.state.metrics.telemetry  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{telemetry.prometheus_port}/metrics", timeout=30).text
    samples = parse_samples(text)
    limit = config.otel_cardinality_limit
    for name in (
        "mcp_tool_executions_total",
        "mcp_tool_execution_duration_seconds_count",
        "mcp_server_operation_duration_seconds_count",
    ):
        series = [labels for (n, labels) in samples if n == name]
        # At most the limit, plus the one overflow series the OpenTelemetry SDK adds.
        assert 0 < len(series) <= limit + 1, (name, len(series))
        assert sum(v for (n, _), v in samples.items() if n == name) == 100_000, name
    # The same request to a service with the default limits: refused whole, with the reason.
    with TestClient(
        create_app(Settings(db_path=tmp_path / "d.db", max_request_bytes=64 * MB))
    ) as d:
        r = d.post("/v1/traces", content=body, headers=PB)
        assert r.status_code == 413 and b"METRICS_OTLP_MAX_SPANS_PER_REQUEST" in r.content
    # More MCP spans than the write queue holds: 413 (a 503 would be retried forever).
    settings = Settings(
        db_path=tmp_path / "q.db", max_request_bytes=64 * MB, otlp_max_spans_per_request=100_000
    )
    with TestClient(create_app(settings)) as q:
        r = q.post("/v1/traces", content=body, headers=PB)
        assert r.status_code == 413 and b"METRICS_QUEUE_MAX_METRICS" in r.content


def test_one_megabyte_attribute_values(
    big: tuple[TestClient, Settings], client: TestClient, settings: Settings
) -> None:
    c, config = big
    huge = "x" * MB
    spans = [
        mcp("tools/call", "kept", extra={"gen_ai.tool.call.arguments": huge}),  # not stored
        mcp("tools/call", huge),
        mcp("tools/call", "t", session=huge),
        mcp("tools/call", "t", extra={"mcp.client.name": huge}),
    ]
    r = c.post("/v1/traces", content=protobuf(spans), headers=PB)
    assert r.status_code == 200
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 3
    assert len(partial.error_message) < 2000  # the rule, not the value
    rows = db_rows(
        config.db_path, "SELECT tool_name, length(coalesce(dimensions, '')) FROM tool_metrics"
    )
    assert rows == [("kept", 0)]
    r = c.post("/v1/traces", content=protobuf([mcp("ping")], {"service.name": huge}), headers=PB)
    assert r.status_code == 403 and len(r.content) < 1000
    # Under the default 1 MiB body limit the request is refused before it is read whole.
    r = client.post("/v1/traces", content=protobuf(spans[:1]), headers=PB)
    assert r.status_code == 413
    assert count(settings) == 0
