"""An MCP server instrumented only with OpenTelemetry, for the OTLP tests; no mcp_metrics.

    python otlp_mcp_server.py {stdio|streamable-http} [--port N] [--with-middleware]

The official ``mcp`` SDK (2.x) makes a span per request (``mcp.server._otel``); the OpenTelemetry
SDK exports each one as it ends with the OTLP/HTTP exporter, configured as a user would: by
``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_HEADERS`` (and ``OTEL_SERVICE_NAME``).
With ``--with-middleware`` the same server also reports through ``mcp_metrics`` (to
``METRICS_SERVICE_URL`` as ``METRICS_SERVICE_NAME``), so both paths can be compared.
"""

from __future__ import annotations

import argparse

import mcp.types as types
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor


def server() -> MCPServer:
    mcp = MCPServer("otel-server")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        return a + b

    @mcp.tool()
    def fail(reason: str) -> str:
        raise ValueError(reason)

    @mcp.tool()
    def soft(text: str) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], is_error=True
        )

    @mcp.tool()
    def internal(text: str) -> str:
        raise MCPError(code=types.INTERNAL_ERROR, message=text)

    return mcp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "streamable-http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--with-middleware", action="store_true")
    args = parser.parse_args()
    provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME, if set
    # One export per span as it ends: before the response is written, so a test that has the
    # response can expect the row (durable acknowledgement) without waiting on a batch timer.
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    mcp = server()
    if args.with_middleware:
        import os

        from mcp_metrics import instrument_server

        instrument_server(mcp, service_name=os.environ["METRICS_SERVICE_NAME"])
    if args.transport == "stdio":
        mcp.run("stdio")
        return
    import uvicorn

    uvicorn.run(mcp.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
