"""The `mcp-metrics` command: meter an MCP server you cannot (or do not want to) change.

    mcp-metrics wrap [--service NAME] [--server-name NAME] -- <command> [args...]
    mcp-metrics proxy --listen HOST:PORT --upstream URL [--service NAME] [--server-name NAME]

`wrap` starts an stdio server as its child and relays stdin/stdout byte for byte; `proxy` sits in
front of a streamable HTTP or SSE server. Both report through the metrics client, configured by
METRICS_SERVICE_URL, METRICS_API_KEY and METRICS_SERVICE_NAME (see the middleware README);
without them the stream is relayed unmetered. Nothing is ever printed on stdout by `wrap`: it is
the MCP stream. Its exit status is the child's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from ..client import ThreadedMetricsClient
from .observer import Observer

__all__ = ["main"]

logger = logging.getLogger("mcp_metrics")
_EXIT_USAGE = 2
_EXIT_NOT_FOUND = 127  # as a shell says "command not found"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{wrap,proxy}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--service", help="service name the API key is for (METRICS_SERVICE_NAME)")
        p.add_argument(
            "--server-name",
            help="server_name dimension (default: the name the server gives in initialize)",
        )
        p.add_argument(
            "--method",
            action="append",
            dest="methods",
            metavar="METHOD",
            help="record only these request methods (repeatable; default: all)",
        )
        p.add_argument("--log-level", default="WARNING", help="on stderr (default WARNING)")

    wrap = sub.add_parser(
        "wrap",
        help="run an stdio MCP server as a child process and meter it",
        description="mcp-metrics wrap [options] -- <command> [args...]",
    )
    common(wrap)
    wrap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the server's command line")

    proxy = sub.add_parser("proxy", help="meter a streamable HTTP / SSE MCP server as a proxy")
    common(proxy)
    proxy.add_argument("--listen", required=True, metavar="HOST:PORT", help="where clients connect")
    proxy.add_argument("--upstream", required=True, metavar="URL", help="the MCP server's URL")
    return parser


def _listen_address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen: expected HOST:PORT, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="mcp-metrics: %(levelname)s %(message)s",
    )
    if args.command == "wrap":
        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("wrap: give the server's command after --")
        _wrap(args, command)
    else:
        try:
            address = _listen_address(args.listen)
            from .http import Upstream

            upstream = Upstream.parse(args.upstream)
        except ImportError:
            print(
                "error: mcp-metrics proxy needs h11: pip install 'mcp-metrics-client[proxy]'",
                file=sys.stderr,
            )
            raise SystemExit(_EXIT_USAGE) from None
        except ValueError as exc:
            parser.error(str(exc))
        _proxy(args, address, upstream)


def _client(args: argparse.Namespace) -> ThreadedMetricsClient:
    try:
        return ThreadedMetricsClient(service=args.service)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(_EXIT_USAGE) from None


def _wrap(args: argparse.Namespace, command: list[str]) -> None:
    from .stdio import StdioWrapper, exit_like

    client = _client(args)
    observer = Observer(
        client, server_name=args.server_name, transport="stdio", methods=args.methods
    )
    wrapper = StdioWrapper(command, observer)
    try:
        status = wrapper.run()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        client.close()
        raise SystemExit(_EXIT_NOT_FOUND) from None
    client.close()  # flushes within METRICS_CLIENT_SHUTDOWN_TIMEOUT_S
    exit_like(status)


def _proxy(args: argparse.Namespace, address: tuple[str, int], upstream: object) -> None:
    from .http import HttpProxy, Upstream

    assert isinstance(upstream, Upstream)
    client = _client(args)
    observer = Observer(
        client, server_name=args.server_name, transport="streamable-http", methods=args.methods
    )
    proxy = HttpProxy(upstream, observer)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        server = await proxy.start(*address)
        bound = server.sockets[0].getsockname()
        print(
            f"mcp-metrics proxy: listening on {bound[0]}:{bound[1]}, forwarding to"
            f" {upstream.scheme}://{upstream.authority.decode()} (paths unchanged)",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        server.close()
        await proxy.aclose()

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"error: cannot listen on {address[0]}:{address[1]}: {exc.strerror}", file=sys.stderr)
        client.close()
        raise SystemExit(_EXIT_USAGE) from None
    client.close()
