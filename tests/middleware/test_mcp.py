"""Real MCP servers (a separate process) and real SDK clients on stdio, SSE and streamable HTTP.

The same tests run with mcp 2.x (both protocol eras: `legacy` opens with `initialize`, `auto`
with the 2026-07-28 `server/discover`) and with mcp 1.x (`scripts/test-middleware-mcp1`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import API_KEY, IngestServer, async_wait_until, free_port, stop_process

mcp = pytest.importorskip("mcp", reason="pip install -e './middleware[mcp]'")

from mcp import StdioServerParameters  # noqa: E402
from mcp.types import Implementation  # noqa: E402

try:
    from mcp import Client

    MCP_MAJOR = 2
    MODES = ["legacy", "auto"]
except ImportError:  # mcp 1.x
    Client = None
    MCP_MAJOR = 1
    MODES = ["legacy"]

pytestmark = pytest.mark.anyio

APP = Path(__file__).with_name("mcp_app.py")
CLIENT = Implementation(name="pytest-client", version="7.0")
HANDSHAKE = {"legacy": "initialize", "auto": "server/discover"}


def server_env(url: str, service: str = "mw-mcp", api_key: str = API_KEY) -> dict[str, str]:
    return {
        **os.environ,
        "METRICS_SERVICE_URL": url,
        "METRICS_API_KEY": api_key,
        "METRICS_SERVICE_NAME": service,
        "METRICS_CLIENT_FLUSH_INTERVAL_S": "0.1",
    }


@contextmanager
def http_server(transport: str, env: dict[str, str], *extra: str) -> Iterator[str]:
    """The app on a loopback port, as a process; yields its MCP URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(APP), transport, "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"MCP server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("MCP server did not listen within 30s") from None
                time.sleep(0.05)
        path = "/sse" if transport == "sse" else "/mcp"
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


class Session:
    """The few client calls the tests need, over either SDK major version."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def list_tools(self) -> list[str]:
        return [t.name for t in (await self.inner.list_tools()).tools]

    async def call(
        self, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Any:
        return await self.inner.call_tool(name, arguments, meta=meta)


@asynccontextmanager
async def connect(transport: str, target: Any, mode: str) -> AsyncIterator[Session]:
    if MCP_MAJOR == 2:
        from mcp.client.sse import sse_client

        server = sse_client(target) if transport == "sse" else target
        async with Client(server, mode=mode, client_info=CLIENT, cache=None) as client:
            yield Session(client)
        return
    from mcp import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if transport == "stdio":
        opener: Any = stdio_client(target)
    elif transport == "sse":
        opener = sse_client(target)
    else:
        opener = streamable_http_client(target)
    async with (
        opener as streams,
        ClientSession(streams[0], streams[1], client_info=CLIENT) as session,
    ):
        await session.initialize()
        yield Session(session)


@asynccontextmanager
async def target_for(transport: str, env: dict[str, str], *extra: str) -> AsyncIterator[Any]:
    if transport == "stdio":
        yield StdioServerParameters(
            command=sys.executable, args=[str(APP), "stdio", *extra], env=env
        )
    else:
        with http_server(transport, env, *extra) as url:
            yield url


def events(ingest: IngestServer, type_: str, **dims: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in ingest.accepted
        if e["type"] == type_ and all(e["dimensions"].get(k) == v for k, v in dims.items())
    ]


async def one_session(session: Session) -> None:
    assert set(await session.list_tools()) >= {"add", "fail", "summarize"}
    result = await session.call(
        "add", {"a": 1, "b": 2}, meta={"agent_id": "agent-7", "tenant_id": "acme"}
    )
    assert not _is_error(result)
    assert _is_error(await session.call("fail", {"reason": "bad input"}))
    assert not _is_error(await session.call("summarize", {"text": "a long text to summarize"}))


def _is_error(result: Any) -> bool:
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", None))


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


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_low_level_server(ingest: IngestServer, transport: str) -> None:
    if MCP_MAJOR == 1 and transport != "stdio":
        pytest.skip("the mcp 1.x low-level server has no ready-made HTTP app; FastMCP covers it")
    async with target_for(transport, server_env(ingest.url), "--lowlevel") as target:
        async with connect(transport, target, "legacy") as session:
            assert set(await session.list_tools()) == {"echo", "soft_fail", "explode"}
            assert not _is_error(await session.call("echo", {"x": 1}))
            assert _is_error(await session.call("soft_fail", {}))
            try:
                exploded = await session.call("explode", {})
            except Exception:  # mcp 2.x: a raised handler error is a JSON-RPC error
                exploded = None
            assert exploded is None or _is_error(exploded)
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
                assert not _is_error(result)
        down_ingest.start()  # the service comes back: queued events are delivered
        await async_wait_until(
            lambda: len(events(down_ingest, "tool_execution", method="tools/call")) == 20,
            timeout=30,
            what="delivery after the service came back",
        )
