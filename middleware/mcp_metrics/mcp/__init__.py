"""Instrument an MCP server built with the official `mcp` SDK (1.x or 2.x) in one call."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import anyio.to_thread

from ..client import MetricsClient
from ..recorder import Recorder
from .recording import DEFAULT_METHODS, Instrumentation, McpRequest, MetadataHook

__all__ = ["DEFAULT_METHODS", "McpRequest", "instrument_server"]

logger = logging.getLogger("mcp_metrics")


def instrument_server(
    server: Any,
    client: Recorder | None = None,
    *,
    service_name: str | None = None,
    server_name: str | None = None,
    transport: str | None = None,
    methods: Collection[str] | None = DEFAULT_METHODS,
    measure_sizes: bool = True,
    metadata: MetadataHook | None = None,
) -> Recorder:
    """Record every tools/call, tools/list and handshake of `server`; returns the metrics client.

    ```python
    from mcp.server import MCPServer          # or: from mcp.server.fastmcp import FastMCP (1.x)
    from mcp_metrics import instrument_server

    mcp = MCPServer("weather")
    instrument_server(mcp, service_name="weather-mcp")   # reads METRICS_SERVICE_URL/_API_KEY
    mcp.run("stdio")                                      # or "sse", "streamable-http"
    ```

    Works with mcp 2.x `MCPServer` / low-level `Server` (as a server middleware) and with mcp
    1.x `FastMCP` / low-level `Server` (by wrapping the request handlers). `transport` overrides
    the detected transport label; `methods=None` records every request method; `metadata` is a
    hook `(request, result) -> dict` for `agent_id`, `tenant_id`, `input_tokens`,
    `output_tokens` (also read from the request's `_meta`, the result's `_meta` and the
    `X-Agent-Id` / `X-Tenant-Id` headers). Queued events are flushed when a session ends.
    """
    if client is None:
        client = MetricsClient(service=service_name)
    name = server_name or getattr(server, "name", None) or client.service
    inst = Instrumentation(
        client,
        server_name=name,
        transport=transport,
        methods=methods,
        measure_sizes=measure_sizes,
        metadata=metadata,
    )
    middleware = getattr(server, "middleware", None)
    if isinstance(middleware, list):
        _install_v2(server, middleware, inst)
    elif hasattr(getattr(server, "_mcp_server", server), "request_handlers"):
        from . import v1

        v1.install(server, inst, lambda: _flush(client))
    else:
        raise TypeError(f"not an MCP server from the mcp SDK: {type(server).__name__}")
    return client


def _install_v2(server: Any, middleware: list[Any], inst: Instrumentation) -> None:
    from .v2 import MetricsServerMiddleware

    if any(isinstance(m, MetricsServerMiddleware) for m in middleware):
        raise RuntimeError("this MCP server is already instrumented")
    middleware.append(MetricsServerMiddleware(inst))
    lowlevel = getattr(server, "_lowlevel_server", server)
    original = lowlevel.lifespan
    client = inst.client

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        # Runs once per stdio/SSE session and once per streamable-HTTP manager.
        async with original(app) as state:
            try:
                yield state
            finally:
                await _flush(client)

    lowlevel.lifespan = lifespan


async def _flush(client: Recorder) -> None:
    try:
        if isinstance(client, MetricsClient):
            await client.flush()
        elif hasattr(client, "flush"):
            # A ThreadedMetricsClient blocks while it flushes: keep that off the event loop.
            await anyio.to_thread.run_sync(client.flush)
    except Exception:
        logger.debug("failed to flush metrics at the end of an MCP session", exc_info=True)
