"""OTLP/HTTP trace ingest: ``POST /v1/traces``. MCP spans become ``tool_execution`` rows.

The path reads as ``POST /metrics`` does: auth (``X-API-Key`` or ``Authorization: Bearer``) ->
rate limit -> content type and encoding -> body (size-limited, gzip inflated under the same
limit) -> decode (``application/x-protobuf`` with ``opentelemetry-proto``, or OTLP/JSON) ->
spans mapped to events and validated by the rules of posted events -> write queue (commit) ->
``ExportTraceServiceResponse``. A span is an MCP span when it has ``mcp.method.name``; other
spans are counted and dropped. Mapping and error rules: docs/otlp.md, after the OpenTelemetry
MCP semantic conventions (semantic-conventions-genai ``model/mcp``, status Development).
"""

from metrics_service.otlp.decode import ResourceSpans, Span, decode_json, decode_protobuf
from metrics_service.otlp.endpoint import TRACES, TracesEndpoint, inflate
from metrics_service.otlp.spans import (
    SERVER_NOT_ERRORS,
    Flows,
    failed,
    map_spans,
    tool_event,
    transport_of,
)

__all__ = [
    "SERVER_NOT_ERRORS",
    "TRACES",
    "Flows",
    "ResourceSpans",
    "Span",
    "TracesEndpoint",
    "decode_json",
    "decode_protobuf",
    "failed",
    "inflate",
    "map_spans",
    "tool_event",
    "transport_of",
]
