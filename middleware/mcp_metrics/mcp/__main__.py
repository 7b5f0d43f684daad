"""Run an existing MCP server with metrics, without touching its code.

    python -m mcp_metrics.mcp package.module:server [--transport stdio|sse|streamable-http]
                              [--host 127.0.0.1] [--port 8000] [--server-name NAME]

`server` is the module attribute holding an `MCPServer` (mcp 2.x) or a `FastMCP` (mcp 1.x), or a
function returning one. `--host`/`--port` are for the HTTP transports (the SDK's defaults are
127.0.0.1:8000). Reporting is configured by METRICS_SERVICE_URL, METRICS_API_KEY and
METRICS_SERVICE_NAME. A target that cannot be loaded or run this way gets one line on stderr and
exit code 2 (stdout stays the MCP stream under stdio).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from . import instrument_server

_EXIT_USAGE = 2


class _LaunchError(Exception):
    """What the launcher says in one line instead of a traceback."""


def load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise _LaunchError(f"expected module:attribute, got {target!r}")
    sys.path.insert(0, "")  # like `python -m`, find modules in the working directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise  # a module the target imports is missing: its traceback says where
        raise _LaunchError(
            f"no module named {exc.name!r} (run from the folder that has it, or set PYTHONPATH)"
        ) from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise _LaunchError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj() if callable(obj) and not hasattr(obj, "run") else obj


def _instrument(server: Any, target: str, server_name: str | None) -> None:
    try:
        instrument_server(server, server_name=server_name)
    except RuntimeError as exc:
        if "already instrumented" not in str(exc):
            raise
        raise _LaunchError(
            f"{target} is already instrumented (its code calls instrument_server): start it"
            " as it is, without `-m mcp_metrics.mcp`, or remove that call"
        ) from None
    except TypeError as exc:
        raise _LaunchError(f"{target}: {exc}") from None


def _run(server: Any, transport: str, host: str | None, port: int | None) -> None:
    if transport == "stdio":
        server.run("stdio")
        return
    address = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = getattr(server, "settings", None)
    if hasattr(settings, "port"):
        # mcp 1.x FastMCP reads the address from its settings; mcp 2.x takes it in run().
        for name, value in address.items():
            setattr(settings, name, value)
        server.run(transport)
    else:
        server.run(transport, **address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mcp_metrics.mcp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("server", help="module:attribute of the MCPServer/FastMCP instance")
    parser.add_argument("--transport", default="stdio", choices=["stdio", "sse", "streamable-http"])
    parser.add_argument("--host", default=None, help="address to listen on (HTTP transports)")
    parser.add_argument(
        "--port", type=int, default=None, help="port to listen on (HTTP transports)"
    )
    parser.add_argument("--server-name", default=None, help="server_name dimension")
    args = parser.parse_args(argv)
    if args.transport == "stdio" and (args.host is not None or args.port is not None):
        parser.error("--host and --port are for --transport sse or streamable-http")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    try:
        server = load(args.server)
        _instrument(server, args.server, args.server_name)
    except _LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(_EXIT_USAGE) from None
    _run(server, args.transport, args.host, args.port)


if __name__ == "__main__":
    main()
