"""The middleware fills the OpenTelemetry MCP semconv fields it knows: protocol_version,
error_type (JSON-RPC code, tool_error, or the exception), transport; a real server over stdio,
with mcp 2.x and 1.x (``scripts/test-middleware-mcp1``)."""

from __future__ import annotations

import contextlib

import pytest

from .conftest import IngestServer, async_wait_until

pytest.importorskip("mcp", reason="pip install -e './middleware[mcp]'")

from ._mcp_support import MCP_MAJOR, connect, events, server_env, target_for

pytestmark = pytest.mark.anyio


async def test_protocol_version_and_error_type_on_every_event(ingest: IngestServer) -> None:
    async with target_for("stdio", server_env(ingest.url), "--lowlevel") as target:
        async with connect("stdio", target, "legacy") as session:
            await session.list_tools()
            await session.call("echo", {"x": 1})
            await session.call("soft_fail", {})
            # mcp 2.x: a raised handler error is a JSON-RPC error
            with contextlib.suppress(Exception):
                await session.call("explode", {})
        await async_wait_until(
            lambda: len(events(ingest, "tool_execution", method="tools/call")) == 3,
            timeout=20,
            what="the tool calls",
        )
    calls = {
        e["dimensions"]["tool_name"]: e["dimensions"]
        for e in events(ingest, "tool_execution", method="tools/call")
    }
    assert "error_type" not in calls["echo"] and calls["echo"]["success"] is True
    assert calls["soft_fail"]["error_type"] == "tool_error"
    assert calls["soft_fail"]["success"] is False
    # mcp 2.x answers the raised error with JSON-RPC -32603 (the middleware sees the exception
    # itself); mcp 1.x's low-level server turns it into an isError result.
    expected = "RuntimeError" if MCP_MAJOR == 2 else "tool_error"
    assert calls["explode"]["error_type"] == expected and calls["explode"]["success"] is False
    every = events(ingest, "tool_execution")
    versions = {e["dimensions"].get("protocol_version") for e in every}
    assert len(versions) == 1 and None not in versions, versions
    assert {e["dimensions"]["transport"] for e in every} == {"stdio"}
    # No OpenTelemetry tracer provider in that server: no trace ids are made up.
    assert not any("trace_id" in (e.get("metadata") or {}) for e in every)


def test_error_type_follows_the_semconv() -> None:
    from mcp_metrics.mcp.recording import SERVER_NOT_ERRORS, error_type_of
    from pydantic import BaseModel, ValidationError

    class Coded(Exception):
        def __init__(self, code: int) -> None:
            self.code = code

    class Params(BaseModel):
        a: int

    try:
        Params.model_validate({"a": "x"})
    except ValidationError as exc:
        invalid = exc
    assert error_type_of("tools/call", {"isError": True}, None) == "tool_error"
    assert error_type_of("tools/list", {"isError": True}, None) is None
    assert error_type_of("tools/call", None, Coded(-32602)) == "-32602"
    assert error_type_of("tools/call", None, invalid) == "-32602"
    assert error_type_of("tools/call", None, KeyError("k")) == "KeyError"
    # The caller's mistakes are not the server's errors; an internal error is.
    assert "-32602" in SERVER_NOT_ERRORS and "-32603" not in SERVER_NOT_ERRORS
