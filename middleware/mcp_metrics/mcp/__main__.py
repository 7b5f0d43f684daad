"""Run an existing MCP server with metrics, without touching its code.

    python -m mcp_metrics.mcp package.module:server [--transport stdio|sse|streamable-http]

`server` is the module attribute holding an `MCPServer` (mcp 2.x) or a `FastMCP` (mcp 1.x), or a
function returning one. Reporting is configured by METRICS_SERVICE_URL, METRICS_API_KEY and
METRICS_SERVICE_NAME.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from . import instrument_server


def load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"expected module:attribute, got {target!r}")
    sys.path.insert(0, "")  # like `python -m`, find modules in the working directory
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if callable(obj) and not hasattr(obj, "run") else obj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcp_metrics.mcp", description=__doc__)
    parser.add_argument("server", help="module:attribute of the MCPServer/FastMCP instance")
    parser.add_argument("--transport", default="stdio", choices=["stdio", "sse", "streamable-http"])
    parser.add_argument("--server-name", default=None, help="server_name dimension")
    args = parser.parse_args(argv)
    server = load(args.server)
    instrument_server(server, server_name=args.server_name)
    server.run(args.transport)


if __name__ == "__main__":
    main()
