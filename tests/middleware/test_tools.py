"""The plain tool decorator: success, failure, isError results, sizes, dispatcher form."""

from __future__ import annotations

from typing import Any

import pytest
from mcp_metrics import MetricsClient, track_tool

from .conftest import API_KEY, IngestServer

pytestmark = pytest.mark.anyio


def make_client(url: str) -> MetricsClient:
    return MetricsClient(url=url, api_key=API_KEY, service="mw-mcp", flush_interval_s=60)


async def test_function_tools_sync_and_async(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as metrics:

        @track_tool(metrics, server_name="calc", transport="stdio", metadata={"tenant_id": "t1"})
        async def add(a: int, b: int) -> dict[str, int]:
            return {"sum": a + b}

        @track_tool(metrics, tool_name="divide", server_name="calc")
        def div(a: int, b: int) -> float:
            return a / b

        assert await add(2, 3) == {"sum": 5}
        assert div(6, 3) == 2
        with pytest.raises(ZeroDivisionError):
            div(1, 0)
    ok, sync_ok, failed = ingest.accepted
    assert ok["type"] == "tool_execution"
    assert ok["dimensions"] == {
        "method": "tools/call",
        "tool_name": "add",
        "success": True,
        "server_name": "calc",
        "transport": "stdio",
        "input_size_bytes": len('{"a":2,"b":3}'),
        "output_size_bytes": len('{"sum":5}'),
    }
    assert ok["metadata"] == {"tenant_id": "t1"}
    assert sync_ok["dimensions"]["tool_name"] == "divide"
    assert failed["dimensions"]["success"] is False
    assert failed["metadata"] == {"error": "ZeroDivisionError"}
    assert all(e["duration_ms"] >= 0 for e in ingest.accepted)


async def test_dispatcher_form_and_is_error_results(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as metrics:

        @track_tool(
            metrics,
            metadata=lambda args, result: {
                "agent_id": args["arguments"].get("agent"),
                "output_tokens": len(str(result)),
            },
        )
        async def call_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            if name == "broken":
                return {"content": [], "isError": True}
            return {"content": [{"type": "text", "text": "ok"}], "isError": False}

        await call_tool("search", {"q": "x", "agent": "agent-7"})
        await call_tool("broken", {})
    good, bad = ingest.accepted
    assert (good["dimensions"]["tool_name"], good["dimensions"]["success"]) == ("search", True)
    assert good["dimensions"]["input_size_bytes"] == len('{"q":"x","agent":"agent-7"}')
    assert good["metadata"]["agent_id"] == "agent-7"
    assert good["metadata"]["output_tokens"] > 0
    assert (bad["dimensions"]["tool_name"], bad["dimensions"]["success"]) == ("broken", False)
