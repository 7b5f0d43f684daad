"""A service instrumented only with OpenTelemetry: the official ``mcp`` SDK's own spans, the
OpenTelemetry SDK and its OTLP/HTTP exporter, configured by the two environment variables the
README names, pointed at a real service process (directly, or through a real ``rotel`` collector).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests._helpers import INGEST_KEY, OTHER_KEY, ServiceProcess, db_rows, free_port, wait_for
from tests._otlp import start_rotel
from tests._prometheus import parse_samples, scrape, total

mcp = pytest.importorskip("mcp", reason="pip install 'mcp>=2.3,<3'")
if not hasattr(mcp, "Client"):
    pytest.skip("these tests use the mcp 2.x client", allow_module_level=True)

SERVER = Path(__file__).with_name("otlp_mcp_server.py")
#: (tool, arguments, stored success): add succeeds; fail raises (the SDK answers isError);
#: soft returns isError; internal raises a JSON-RPC -32603; nope is an unknown tool.
CALLS: list[tuple[str, dict[str, Any], int]] = [
    ("add", {"a": 1, "b": 2}, 1),
    ("add", {"a": 3, "b": 4}, 1),
    ("fail", {"reason": "bad input"}, 0),
    ("soft", {"text": "isError"}, 0),
    ("internal", {"text": "boom"}, 0),
    ("nope", {}, 0),
    ("add", {"a": 5, "b": 6}, 1),
]


@pytest.fixture
def metrics_service(tmp_path: Path) -> Iterator[tuple[ServiceProcess, str]]:
    scrape_port = free_port()
    proc = ServiceProcess(
        db_path=tmp_path / "m.db",
        env={
            "METRICS_API_KEY_WEATHER": INGEST_KEY,
            "METRICS_API_KEY_WEATHER_MW": OTHER_KEY,
            "OTEL_PROMETHEUS_PORT": str(scrape_port),
        },
        log_path=tmp_path / "service.log",
    )
    proc.start()
    yield proc, f"http://127.0.0.1:{scrape_port}/metrics"
    proc.stop()


def otel_env(endpoint: str, headers: str) -> dict[str, str]:
    """What the README tells an MCP server to set (plus its service name)."""
    return {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": headers,
        "OTEL_SERVICE_NAME": "weather",
    }


@asynccontextmanager
async def mcp_target(transport: str, env: dict[str, str], *extra: str) -> AsyncIterator[Any]:
    if transport == "stdio":
        yield mcp.StdioServerParameters(
            command=sys.executable, args=[str(SERVER), "stdio", *extra], env=env
        )
        return
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "streamable-http", "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import httpx

        def up() -> bool:
            assert proc.poll() is None, "the MCP server exited"
            try:
                httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
                return True
            except httpx.HTTPError:
                return False

        wait_for(up, 30, 0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(15)


async def run_calls(transport: str, env: dict[str, str], *extra: str) -> list[bool]:
    """The CALLS over a real client session; what the client saw fail, per call."""
    seen: list[bool] = []
    async with (
        mcp_target(transport, env, *extra) as target,
        mcp.Client(target, mode="legacy") as client,
    ):
        assert {t.name for t in (await client.list_tools()).tools} >= {"add", "fail", "soft"}
        for name, arguments, _ in CALLS:
            try:
                result = await client.call_tool(name, arguments)
                seen.append(bool(result.is_error))
            except mcp.MCPError:
                seen.append(True)
    return seen


def call_rows(db: Path) -> list[tuple[Any, ...]]:
    return db_rows(
        db,
        "SELECT tool_name, success, error_type, service, server_name, protocol_version, trace_id,"
        " span_id FROM tool_metrics WHERE method = 'tools/call' ORDER BY ts",
    )


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
def test_sdk_spans_give_one_row_per_tool_call(
    transport: str, metrics_service: tuple[ServiceProcess, str]
) -> None:
    service, scrape_url = metrics_service
    env = otel_env(service.url, f"x-api-key={INGEST_KEY}")
    failed = anyio.run(run_calls, transport, env)
    assert failed == [not ok for _, _, ok in CALLS]
    rows = wait_for(lambda: (r := call_rows(service.db_path)) and len(r) >= len(CALLS) and r)
    assert len(rows) == len(CALLS)
    assert [(tool, ok) for tool, ok, *_ in rows] == [(t, ok) for t, _, ok in CALLS]
    assert [r[2] for r in rows] == [
        None,
        None,
        "tool_error",
        "tool_error",
        "-32603",
        "tool_error",
        None,
    ]
    assert {(r[3], r[4]) for r in rows} == {("weather", "weather")}
    assert all(r[5] for r in rows)  # mcp.protocol.version, as negotiated
    assert len({r[7] for r in rows}) == len(CALLS)
    # The handshake and the listing are MCP operations too.
    methods = db_rows(service.db_path, "SELECT DISTINCT method FROM tool_metrics")
    assert {"initialize", "tools/list"} <= {m for (m,) in methods}
    samples = parse_samples(scrape(scrape_url))
    calls = "mcp_server_operation_duration_seconds_count"
    assert total(samples, calls, mcp_method_name="tools/call") == len(CALLS)
    assert total(samples, calls, mcp_method_name="tools/call", error_type="tool_error") == 3


def test_bearer_header_as_otel_exporter_otlp_headers_writes_it(
    metrics_service: tuple[ServiceProcess, str],
) -> None:
    service, _ = metrics_service
    # OTEL_EXPORTER_OTLP_HEADERS values are URL-encoded: the space of "Bearer <key>" is %20.
    env = otel_env(service.url, f"authorization=Bearer%20{INGEST_KEY}")
    anyio.run(run_calls, "stdio", env)
    wait_for(lambda: len(call_rows(service.db_path)) == len(CALLS))


def test_spans_relayed_by_a_collector_arrive_once_each(
    tmp_path: Path, metrics_service: tuple[ServiceProcess, str]
) -> None:
    service, _ = metrics_service
    extra = ["--otlp-exporter-traces-custom-headers", f"x-api-key={INGEST_KEY}"]
    with start_rotel(tmp_path / "rotel", service.url, extra) as rotel:
        env = otel_env(rotel.http_endpoint, "")
        anyio.run(run_calls, "streamable-http", env)
        rows = wait_for(
            lambda: (r := call_rows(service.db_path)) and len(r) >= len(CALLS) and r, 20
        )
        assert [(t, ok) for t, ok, *_ in rows] == [(t, ok) for t, _, ok in CALLS]
        # A later session through the same collector: once its spans are in, a repeat of the
        # earlier batches (a retry of something already committed) would have been too.
        anyio.run(run_calls, "stdio", env)
        wait_for(lambda: len(call_rows(service.db_path)) >= 2 * len(CALLS), 20)
    count, distinct = db_rows(
        service.db_path, "SELECT count(*), count(DISTINCT span_id) FROM tool_metrics"
    )[0]
    assert count == distinct
    assert len(call_rows(service.db_path)) == 2 * len(CALLS)


def test_the_middleware_and_the_sdk_spans_store_the_same_call_the_same_way(
    metrics_service: tuple[ServiceProcess, str],
) -> None:
    """One server, both paths: mcp_metrics posts events (as weather-mw), the SDK's spans go over
    OTLP (as weather). The middleware runs inside the SDK's span and takes its ids."""
    service, _ = metrics_service
    env = {
        **otel_env(service.url, f"x-api-key={INGEST_KEY}"),
        "METRICS_SERVICE_URL": service.url,
        "METRICS_API_KEY": OTHER_KEY,
        "METRICS_SERVICE_NAME": "weather-mw",
    }
    anyio.run(run_calls, "stdio", env, "--with-middleware")
    shared = "method, tool_name, success, error_type, protocol_version, trace_id, span_id"

    def both() -> tuple[list[Any], list[Any]] | None:
        rows = [
            db_rows(
                service.db_path,
                f"SELECT {shared} FROM tool_metrics WHERE service = ? AND method = 'tools/call'"
                " ORDER BY span_id",
                (name,),
            )
            for name in ("weather", "weather-mw")
        ]
        return (rows[0], rows[1]) if all(len(r) == len(CALLS) for r in rows) else None

    spans, events = wait_for(both, 20)
    assert spans == events
    assert all(trace_id and span_id for *_, trace_id, span_id in events)
