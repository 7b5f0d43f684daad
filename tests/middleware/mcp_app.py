"""An instrumented MCP server for the tests, run as its own process on any transport.

    python mcp_app.py {stdio|sse|streamable-http} [--port N] [--lowlevel]

Uses mcp 2.x (`MCPServer`, low-level `Server`) or mcp 1.x (`FastMCP`, low-level `Server`),
whichever is installed, and reports to METRICS_SERVICE_URL as METRICS_SERVICE_NAME.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import anyio
import mcp.types as types
from mcp_metrics import instrument_server

try:
    from mcp.server import MCPServer as HighLevel

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as HighLevel

    MCP_MAJOR = 1


def tokens_hook(request: Any, result: Any) -> dict[str, Any]:
    return {"hook": "yes"} if request.method == "tools/call" else {}


def high_level() -> Any:
    server = HighLevel("calc-server")
    instrument_server(server, service_name=os.environ["METRICS_SERVICE_NAME"], metadata=tokens_hook)

    @server.tool()
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool()
    def fail(reason: str) -> str:
        raise ValueError(reason)

    @server.tool()
    def summarize(text: str) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text[:10])],
            _meta={"input_tokens": len(text), "output_tokens": 10},
        )

    return server


TOOLS = [
    types.Tool(name="echo", description="echo", inputSchema={"type": "object"}),
    types.Tool(name="soft_fail", description="isError", inputSchema={"type": "object"}),
    types.Tool(name="explode", description="raises", inputSchema={"type": "object"}),
]


def low_level_v2() -> Any:
    from mcp.server import Server

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def call_tool(ctx: Any, params: Any) -> types.CallToolResult:
        if params.name == "explode":
            raise RuntimeError("exploded")
        text = types.TextContent(type="text", text=str(params.arguments))
        return types.CallToolResult(content=[text], isError=params.name == "soft_fail")

    server = Server("low-server", on_list_tools=list_tools, on_call_tool=call_tool)
    instrument_server(server, service_name=os.environ["METRICS_SERVICE_NAME"])
    return server


def low_level_v1() -> Any:
    from mcp.server.lowlevel import Server

    server = Server("low-server")
    # Instrumented before the handlers are registered: they are wrapped as they arrive.
    instrument_server(server, service_name=os.environ["METRICS_SERVICE_NAME"])

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return TOOLS

    @server.call_tool()
    async def call_tool(name: str, arguments: dict[str, Any]) -> Any:
        if name == "explode":
            raise RuntimeError("exploded")
        text = types.TextContent(type="text", text=str(arguments))
        if name == "soft_fail":
            return types.CallToolResult(content=[text], isError=True)
        return [text]

    return server


async def run_low_level_stdio(server: Any) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "sse", "streamable-http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lowlevel", action="store_true")
    args = parser.parse_args()
    if args.lowlevel:
        server = low_level_v2() if MCP_MAJOR == 2 else low_level_v1()
        if args.transport == "stdio":
            anyio.run(run_low_level_stdio, server)
            return
        app = server.streamable_http_app()  # mcp 2.x low-level only
    else:
        server = high_level()
        if args.transport == "stdio":
            server.run("stdio")
            return
        app = server.sse_app() if args.transport == "sse" else server.streamable_http_app()
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
