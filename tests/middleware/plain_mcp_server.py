"""An MCP server that knows nothing about metrics: `python -m mcp_metrics.mcp` wraps it."""

from __future__ import annotations

try:
    from mcp.server import MCPServer as HighLevel
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as HighLevel

server = HighLevel("plain-server")


@server.tool()
def shout(text: str) -> str:
    return text.upper()
