"""End to end: every piece reports to the real metrics service; rows are read from its SQLite."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from mcp_metrics import (
    MetricsClient,
    add_auth_metrics_middleware,
    hash_value,
    report_auth_outcome,
    track_discovery,
    track_tool,
)

from .conftest import RunningService, async_wait_until, free_port, service_keys

pytestmark = pytest.mark.anyio


def client_for(service: RunningService, name: str = "mw-test", **options: object) -> MetricsClient:
    return MetricsClient(
        url=service.url,
        api_key=service.api_keys[name],
        service=name,
        version="1.0.0",
        instance_id=f"it-{uuid.uuid4().hex[:12]}",
        flush_interval_s=0.05,
        **options,  # type: ignore[arg-type]
    )


async def test_each_metric_type_lands_in_its_table(metrics_service: RunningService) -> None:
    client = client_for(metrics_service)
    instance = client.config.instance_id
    async with client:

        @track_tool(client, server_name="calc", transport="stdio")
        async def add(a: int, b: int) -> int:
            return a + b

        await add(2, 3)
        client.record_tool_execution(
            tool_name="search",
            success=False,
            client_name="claude",
            client_version="1.2",
            session_id="s-1",
            metadata={"agent_id": "agent-7", "tenant_id": "acme", "input_tokens": 12.0},
        )
        client.record_auth(success=False, method="jwt", server="auth", user_hash=hash_value("bob"))
        with track_discovery(client, "weather tools", top_k=10, top_n=3) as d:
            d.results_count = 4
        client.record_protocol_latency(
            flow_step="initialize->tools/list",
            duration_ms=12.5,
            server_name="calc",
            session_id="s-1",
        )
        client.record_custom("cache_miss", region="eu")
        assert await client.flush(10)
    stats = client.stats()
    assert (stats.sent, stats.rejected, stats.dropped_refused) == (6, 0, 0)

    tools = metrics_service.wait_rows(
        "SELECT * FROM tool_metrics WHERE instance_id = ? ORDER BY id", (instance,), count=2
    )
    assert [(r["tool_name"], r["success"], r["method"]) for r in tools] == [
        ("add", 1, "tools/call"),
        ("search", 0, "tools/call"),
    ]
    assert tools[0]["server_name"] == "calc" and tools[0]["transport"] == "stdio"
    assert tools[0]["input_size_bytes"] == len('{"a":2,"b":3}')
    assert tools[0]["output_size_bytes"] == 1
    assert tools[0]["service"] == "mw-test" and tools[0]["service_version"] == "1.0.0"
    assert (tools[1]["client_name"], tools[1]["client_version"], tools[1]["session_id"]) == (
        "claude",
        "1.2",
        "s-1",
    )
    assert (tools[1]["agent_id"], tools[1]["tenant_id"], tools[1]["input_tokens"]) == (
        "agent-7",
        "acme",
        12,
    )

    [auth] = metrics_service.rows("SELECT * FROM auth_metrics WHERE instance_id = ?", (instance,))
    assert (auth["success"], auth["method"], auth["server"]) == (0, "jwt", "auth")
    assert auth["user_hash"] == hash_value("bob")

    [disc] = metrics_service.rows(
        "SELECT * FROM discovery_metrics WHERE instance_id = ?", (instance,)
    )
    assert disc["query"] == hash_value("weather tools")
    assert (disc["results_count"], disc["top_k"], disc["top_n"]) == (4, 10, 3)

    [flow] = metrics_service.rows(
        "SELECT * FROM protocol_latency_metrics WHERE instance_id = ?", (instance,)
    )
    assert (flow["flow_step"], flow["duration_ms"]) == ("initialize->tools/list", 12.5)

    types = metrics_service.rows(
        "SELECT type, count(*) AS n FROM metrics WHERE instance_id = ? GROUP BY type", (instance,)
    )
    assert {r["type"]: r["n"] for r in types} == {
        "tool_execution": 2,
        "auth_request": 1,
        "tool_discovery": 1,
        "protocol_latency": 1,
        "custom": 1,
    }


async def test_refused_keys_are_dropped_not_retried(metrics_service: RunningService) -> None:
    wrong_service = MetricsClient(
        url=metrics_service.url,
        api_key=metrics_service.api_keys["mw-auth"],  # a real key, issued for another service
        service="mw-test",
        flush_interval_s=0.05,
    )
    unknown = MetricsClient(
        url=metrics_service.url, api_key="x" * 40, service="mw-test", flush_interval_s=0.05
    )
    async with wrong_service, unknown:
        wrong_service.record_custom("nope")
        unknown.record_custom("nope")
        assert await wrong_service.flush(10)
        assert await unknown.flush(10)
    for client, status in ((wrong_service, "403"), (unknown, "401")):
        stats = client.stats()
        assert (stats.dropped_refused, stats.retries, stats.sent) == (1, 0, 0)
        assert stats.last_error == f"HTTP {status}"


def test_auth_middleware_rows(
    metrics_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"srv-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("METRICS_SERVICE_URL", metrics_service.url)
    monkeypatch.setenv("METRICS_API_KEY", metrics_service.api_keys["mw-auth"])
    app = FastAPI()

    @app.post("/oauth/{provider}/token")
    async def token(provider: str, request: Request) -> dict[str, bool]:
        ok = request.headers.get("x-code") == "good"
        report_auth_outcome(request, success=ok, user_id="carol@example.com", method="oauth")
        return {"ok": ok}

    client = add_auth_metrics_middleware(
        app, service_name="mw-auth", auth_routes=["/oauth/{provider}/token"], server=marker
    )
    with TestClient(app) as http:
        assert http.post("/oauth/github/token", headers={"X-Code": "good"}).json() == {"ok": True}
        assert http.post("/oauth/github/token", headers={"X-Code": "bad"}).json() == {"ok": False}
    assert client.stats().sent == 2
    rows = metrics_service.wait_rows(
        "SELECT * FROM auth_metrics WHERE server = ? ORDER BY id", (marker,), count=2
    )
    assert [(r["success"], r["method"]) for r in rows] == [(1, "oauth"), (0, "oauth")]
    assert {r["user_hash"] for r in rows} == {hash_value("carol@example.com")}
    assert all(r["service"] == "mw-auth" and r["duration_ms"] >= 0 for r in rows)
    assert '"/oauth/{provider}/token"' in rows[0]["dimensions"]


async def test_service_down_then_up_delivers_later(
    service_runner: Callable[[int, dict[str, str]], Any],
) -> None:
    port = free_port()
    keys = service_keys()
    client = MetricsClient(
        url=f"http://127.0.0.1:{port}",
        api_key=keys["mw-test"],
        service="mw-test",
        flush_interval_s=0.05,
        backoff_base_s=0.05,
        backoff_max_s=0.3,
    )
    async with client:
        for i in range(50):
            client.record_custom("while-down", value=i)
        await async_wait_until(lambda: client.stats().retries >= 2, what="retries while down")
        assert client.stats().sent == 0
        with service_runner(port, keys) as service:
            await async_wait_until(lambda: client.stats().sent == 50, timeout=30, what="delivery")
            rows = service.wait_rows(
                "SELECT value FROM custom_metrics WHERE service = 'mw-test'", count=50
            )
    assert sorted(r["value"] for r in rows) == list(range(50))


async def test_real_429_backs_off_until_retry_after(metrics_service: RunningService) -> None:
    """A key of one request a minute on the real service: the second batch gets 429 with a
    Retry-After near 60 s, and the client waits instead of hammering."""
    import httpx

    from .conftest import SERVICE_PYTHON

    created = subprocess.run(
        [
            SERVICE_PYTHON,
            "-m",
            "metrics_service",
            "keys",
            "create",
            "--service",
            "mw-test",
            "--rate-limit",
            "1",
        ],
        env={**os.environ, "SQLITE_DB_PATH": str(metrics_service.db_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = re.search(r"(mcpm_\S+)", created.stdout).group(1)  # type: ignore[union-attr]
    client = MetricsClient(
        url=metrics_service.url, api_key=key, service="mw-test", flush_interval_s=0.05
    )

    def refused() -> float:
        return sum(metrics_service.series("metrics_service_rate_limited_requests_total").values())

    # The service loads new keys within its reload interval (2 s). Ask /rate-limit (it spends no
    # budget) twice a second only: each 401 counts against the per-address failed-auth limit
    # (30 a minute) that the other tests on this shared service also draw on.
    deadline = time.monotonic() + 15
    while (
        httpx.get(metrics_service.url + "/rate-limit", headers={"X-API-Key": key}).status_code
        != 200
    ):
        assert time.monotonic() < deadline, "the new key was not loaded within 15 s"
        await asyncio.sleep(0.5)
    async with client:
        client.record_custom("first")
        await async_wait_until(lambda: client.stats().sent == 1, 15, "the first event delivered")
        before = refused()
        client.record_custom("second")
        await async_wait_until(
            lambda: client.stats().retries >= 1, 10, "a 429 and a scheduled retry"
        )
        assert client.stats().last_error == "HTTP 429"
        # Three seconds later the client has still made exactly one refused attempt: it honours
        # the ~60 s Retry-After rather than retrying on its own shorter backoff.
        await asyncio.sleep(3)
        stats = client.stats()
        assert (stats.sent, stats.retries, stats.queued + stats.in_flight) == (1, 1, 1)
        assert refused() == before + 1
        await client.aclose(0.1)  # the deadline passes: the queued event is dropped, counted
    assert client.stats().dropped_shutdown == 1
