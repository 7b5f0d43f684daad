"""Real MCP servers (a separate process) and real SDK clients on stdio, SSE and streamable HTTP.

The same tests run with mcp 2.x (both protocol eras: `legacy` opens with `initialize`, `auto`
with the 2026-07-28 `server/discover`) and with mcp 1.x (`scripts/test-installed`).
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from .conftest import REPO_ROOT, IngestServer, RunningService, async_wait_until

pytest.importorskip("mcp", reason="pip install -e './middleware[mcp]'")

from ._mcp_support import (
    HANDSHAKE,
    MCP_MAJOR,
    MODES,
    StdioServerParameters,
    connect,
    events,
    is_error,
    one_session,
    server_env,
    target_for,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ["stdio", "sse", "streamable-http"])
async def test_every_call_and_one_flow_per_session(
    ingest: IngestServer, transport: str, mode: str
) -> None:
    sessions = 1 if transport == "stdio" else 2  # stdio: one process, one session
    async with target_for(transport, server_env(ingest.url)) as target:
        for _ in range(sessions):
            async with connect(transport, target, mode) as session:
                await one_session(session)
        await async_wait_until(
            lambda: (
                len(events(ingest, "protocol_latency")) >= 3 * sessions
                and len(events(ingest, "tool_execution", method="tools/call")) >= 3 * sessions
            ),
            timeout=20,
            what="the session's events",
        )

    calls = events(ingest, "tool_execution", method="tools/call")
    assert len(calls) == 3 * sessions
    by_tool = {e["dimensions"]["tool_name"]: e for e in calls}
    add, fail, summarize = by_tool["add"], by_tool["fail"], by_tool["summarize"]
    for event in calls:
        dims = event["dimensions"]
        assert dims["client_name"] == "pytest-client"
        assert dims["client_version"] == "7.0"
        assert dims["server_name"] == "calc-server"
        assert dims["transport"] == transport
        assert event["duration_ms"] >= 0
        assert event["metadata"]["hook"] == "yes"
        if transport == "stdio":
            assert "session_id" not in dims
    assert add["dimensions"]["success"] is True
    assert add["dimensions"]["input_size_bytes"] == len(
        json.dumps({"a": 1, "b": 2}, separators=(",", ":"))
    )
    assert add["dimensions"]["output_size_bytes"] > 0
    assert add["metadata"]["agent_id"] == "agent-7"
    assert add["metadata"]["tenant_id"] == "acme"
    assert fail["dimensions"]["success"] is False
    assert summarize["dimensions"]["success"] is True
    assert summarize["metadata"]["input_tokens"] == len("a long text to summarize")
    assert summarize["metadata"]["output_tokens"] == 10

    handshake = HANDSHAKE[mode]
    assert len(events(ingest, "tool_execution", method=handshake)) == sessions
    assert len(events(ingest, "tool_execution", method="tools/list")) == sessions

    flows = events(ingest, "protocol_latency")
    assert len(flows) == 3 * sessions
    steps = sorted(f["dimensions"]["flow_step"] for f in flows)
    assert steps == sorted(
        ["initialize->tools/list", "tools/list->tools/call", "initialize->tools/call"] * sessions
    )
    for flow in flows:
        assert flow["metadata"] == {"handshake_method": handshake}
        assert flow["duration_ms"] >= 0
        assert flow["dimensions"]["client_name"] == "pytest-client"
    if transport != "stdio" and not (
        MCP_MAJOR == 2 and mode == "auto" and transport == "streamable-http"
    ):
        # Sessions have ids (the 2026-07-28 HTTP transport has none).
        ids = {f["dimensions"]["session_id"] for f in flows}
        assert len(ids) == sessions
        assert {c["dimensions"]["session_id"] for c in calls} == ids


# The mcp 1.x low-level server has no ready-made HTTP app (FastMCP covers 1.x over HTTP).
@pytest.mark.parametrize("transport", ["stdio", "streamable-http"] if MCP_MAJOR == 2 else ["stdio"])
async def test_low_level_server(ingest: IngestServer, transport: str) -> None:
    async with target_for(transport, server_env(ingest.url), "--lowlevel") as target:
        async with connect(transport, target, "legacy") as session:
            assert set(await session.list_tools()) == {"echo", "soft_fail", "explode"}
            assert not is_error(await session.call("echo", {"x": 1}))
            assert is_error(await session.call("soft_fail", {}))
            try:
                exploded = await session.call("explode", {})
            except Exception:  # mcp 2.x: a raised handler error is a JSON-RPC error
                exploded = None
            assert exploded is None or is_error(exploded)
        await async_wait_until(
            lambda: (
                len(events(ingest, "tool_execution", method="tools/call")) == 3
                and len(events(ingest, "protocol_latency")) == 3
            ),
            timeout=20,
            what="the low-level server's events",
        )
    outcome = {
        e["dimensions"]["tool_name"]: e["dimensions"]["success"]
        for e in events(ingest, "tool_execution", method="tools/call")
    }
    assert outcome == {"echo": True, "soft_fail": False, "explode": False}
    assert events(ingest, "tool_execution", method="initialize")
    assert {
        e["dimensions"]["server_name"] for e in ingest.accepted if "server_name" in e["dimensions"]
    } == {"low-server"}


async def test_mcp_server_keeps_serving_when_metrics_are_down(down_ingest: IngestServer) -> None:
    env = {**server_env(down_ingest.url), "METRICS_CLIENT_SHUTDOWN_TIMEOUT_S": "0.2"}
    async with target_for("streamable-http", env) as target:
        async with connect("streamable-http", target, "legacy") as session:
            for i in range(20):
                result = await session.call("add", {"a": i, "b": 1})
                assert not is_error(result)
        down_ingest.start()  # the service comes back: queued events are delivered
        await async_wait_until(
            lambda: len(events(down_ingest, "tool_execution", method="tools/call")) == 20,
            timeout=30,
            what="delivery after the service came back",
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_mcp_rows_in_the_real_service(
    metrics_service: RunningService, transport: str, mode: str
) -> None:
    instance = f"mcp-{uuid.uuid4().hex[:12]}"
    env = {
        **server_env(metrics_service.url, "mw-mcp", metrics_service.api_keys["mw-mcp"]),
        "METRICS_INSTANCE_ID": instance,
    }
    add_ok = frozenset(
        {
            ("tool_name", "add"),
            ("success", "true"),
            ("method", "tools/call"),
            ("service", "mw-mcp"),
            ("client_name", "pytest-client"),
            ("server_name", "calc-server"),
        }
    )
    before = metrics_service.series("mcp_tool_executions_total").get(add_ok, 0.0)
    async with target_for(transport, env) as target:
        async with connect(transport, target, mode) as session:
            await one_session(session)
        calls = metrics_service.wait_rows(
            "SELECT * FROM tool_metrics"
            " WHERE instance_id = ? AND method = 'tools/call' ORDER BY id",
            (instance,),
            count=3,
        )
        flows = metrics_service.wait_rows(
            "SELECT * FROM protocol_latency_metrics WHERE instance_id = ?", (instance,), count=3
        )
    assert [(r["tool_name"], r["success"]) for r in calls] == [
        ("add", 1),
        ("fail", 0),
        ("summarize", 1),
    ]
    add, _, summarize = calls
    assert (add["client_name"], add["client_version"], add["server_name"]) == (
        "pytest-client",
        "7.0",
        "calc-server",
    )
    assert add["transport"] == transport
    assert add["input_size_bytes"] == len('{"a":1,"b":2}') and add["output_size_bytes"] > 0
    assert (add["agent_id"], add["tenant_id"]) == ("agent-7", "acme")
    assert (summarize["input_tokens"], summarize["output_tokens"]) == (
        len("a long text to summarize"),
        10,
    )
    handshake = metrics_service.rows(
        "SELECT method FROM tool_metrics WHERE instance_id = ? AND method != 'tools/call'",
        (instance,),
    )
    assert sorted(r["method"] for r in handshake) == sorted([HANDSHAKE[mode], "tools/list"])
    assert sorted(r["flow_step"] for r in flows) == [
        "initialize->tools/call",
        "initialize->tools/list",
        "tools/list->tools/call",
    ]
    assert all(json.loads(r["metadata"]) == {"handshake_method": HANDSHAKE[mode]} for r in flows)
    # The same calls as Prometheus series on the service's scrape endpoint (sessions of other
    # tests share this service, so compare against the count before this session).
    executions = metrics_service.series("mcp_tool_executions_total")
    assert executions[add_ok] == before + 1
    failed = {
        k: v
        for k, v in executions.items()
        if ("tool_name", "fail") in k and ("success", "false") in k
    }
    assert failed and all(("client_name", "pytest-client") in k for k in failed)
    steps = metrics_service.series("mcp_protocol_latency_seconds_count")
    assert {dict(k)["flow_step"] for k in steps} >= {
        "initialize->tools/list",
        "tools/list->tools/call",
        "initialize->tools/call",
    }
    assert metrics_service.series("mcp_tool_input_size_bytes_count")


async def test_wrap_an_existing_server_from_the_command_line(ingest: IngestServer) -> None:
    env = {**server_env(ingest.url), "PYTHONPATH": str(REPO_ROOT)}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_metrics.mcp", "tests.middleware.plain_mcp_server:server"],
        env=env,
        cwd=str(REPO_ROOT),
    )
    async with connect("stdio", params, "legacy") as session:
        assert await session.list_tools() == ["shout"]
        assert not is_error(await session.call("shout", {"text": "hi"}))
    await async_wait_until(
        lambda: events(ingest, "tool_execution", method="tools/call"), what="the wrapped call"
    )
    [call] = events(ingest, "tool_execution", method="tools/call")
    assert call["dimensions"]["tool_name"] == "shout"
    assert call["dimensions"]["server_name"] == "plain-server"
    assert call["dimensions"]["transport"] == "stdio"
