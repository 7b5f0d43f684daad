"""OTLP trace requests for tests, built from one description in both encodings.

``protobuf(...)`` uses the official ``opentelemetry-proto`` messages; ``otlp_json(...)`` writes the
OTLP/JSON form by hand after the spec (hex ids, 64-bit integers as strings, lowerCamelCase), so a
test can check that both decode to the same rows.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SERVER, CLIENT, INTERNAL = 2, 3, 1
_ids = itertools.count(1)


@dataclass
class SpanSpec:
    attributes: dict[str, Any]
    name: str = "span"
    kind: int = SERVER
    start_ns: int = 0
    end_ns: int = 0
    error: bool = False
    trace_id: str = field(default_factory=lambda: f"{next(_ids):032x}")
    span_id: str = field(default_factory=lambda: f"{next(_ids):016x}")


def mcp(
    method: str,
    tool: str | None = None,
    *,
    error_type: str | None = None,
    kind: int = SERVER,
    session: str | None = None,
    transport: str | None = "pipe",
    version: str | None = "2025-06-18",
    at_ns: int | None = None,
    duration_ms: float = 5.0,
    trace_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> SpanSpec:
    """An MCP span as the SDKs write it (semconv attribute names)."""
    attrs: dict[str, Any] = {"mcp.method.name": method}
    if tool is not None:
        attrs["gen_ai.tool.name"] = tool
        attrs["gen_ai.operation.name"] = "execute_tool"
    if error_type is not None:
        attrs["error.type"] = error_type
    if session is not None:
        attrs["mcp.session.id"] = session
    if transport is not None:
        attrs["network.transport"] = transport
    if version is not None:
        attrs["mcp.protocol.version"] = version
    attrs.update(extra or {})
    start = time.time_ns() - 60_000_000_000 if at_ns is None else at_ns
    spec = SpanSpec(
        attrs,
        name=f"{method} {tool}" if tool else method,
        kind=kind,
        start_ns=start,
        end_ns=start + int(duration_ms * 1e6),
        error=error_type is not None,
    )
    if trace_id is not None:
        spec.trace_id = trace_id
    return spec


def plain(name: str = "GET /health") -> SpanSpec:
    """A span that is not an MCP span (no mcp.method.name)."""
    now = time.time_ns()
    return SpanSpec({"http.request.method": "GET"}, name=name, start_ns=now, end_ns=now + 1000)


def _any(value: Any, target: AnyValue) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    else:
        target.string_value = value


def _kvs(attrs: dict[str, Any]) -> list[KeyValue]:
    out = []
    for key, value in attrs.items():
        kv = KeyValue(key=key)
        _any(value, kv.value)
        out.append(kv)
    return out


def protobuf(spans: list[SpanSpec], resource: dict[str, Any] | None = None) -> bytes:
    """One resource (``service.name`` = svc unless given) with one scope holding ``spans``."""
    return protobuf_resources([(resource or {"service.name": "svc"}, spans)])


def protobuf_resources(resources: list[tuple[dict[str, Any], list[SpanSpec]]]) -> bytes:
    request = ExportTraceServiceRequest()
    for attrs, spans in resources:
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(_kvs(attrs))
        ss = rs.scope_spans.add()
        ss.scope.name = "tests"
        for spec in spans:
            s = ss.spans.add()
            s.trace_id = bytes.fromhex(spec.trace_id)
            s.span_id = bytes.fromhex(spec.span_id)
            s.name = spec.name
            s.kind = spec.kind
            s.start_time_unix_nano = spec.start_ns
            s.end_time_unix_nano = spec.end_ns
            s.attributes.extend(_kvs(spec.attributes))
            if spec.error:
                s.status.code = 2
    return bytes(request.SerializeToString())


def _json_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value}


def _json_kvs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _json_value(v)} for k, v in attrs.items()]


def otlp_json(spans: list[SpanSpec], resource: dict[str, Any] | None = None) -> bytes:
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": _json_kvs(resource or {"service.name": "svc"})},
                "scopeSpans": [
                    {
                        "scope": {"name": "tests"},
                        "spans": [
                            {
                                "traceId": s.trace_id,
                                "spanId": s.span_id,
                                "name": s.name,
                                "kind": s.kind,
                                "startTimeUnixNano": str(s.start_ns),
                                "endTimeUnixNano": str(s.end_ns),
                                "attributes": _json_kvs(s.attributes),
                                **({"status": {"code": 2}} if s.error else {}),
                            }
                            for s in spans
                        ],
                    }
                ],
            }
        ]
    }
    return json.dumps(body).encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bulk(n: int, *, distinct_tools: bool = True) -> bytes:
    """One request of ``n`` tools/call server spans with distinct span ids (and tool names),
    in protobuf. Built from one serialized span with its id and name patched per copy, since
    building ``n`` messages would cost the test more than the service spends on them."""
    template = mcp("tools/call", "tool-000000", at_ns=time.time_ns() - 120_000_000_000)
    template.span_id = "00000000000000ff"
    one = ExportTraceServiceRequest.FromString(protobuf([template]))
    resource = one.resource_spans[0].resource.SerializeToString()
    span = one.resource_spans[0].scope_spans[0].spans[0].SerializeToString()
    id_at = span.index(bytes.fromhex(template.span_id))
    name_at = [i for i in range(len(span)) if span.startswith(b"tool-000000", i)]
    parts = []
    for i in range(n):
        copy = bytearray(span)
        copy[id_at : id_at + 8] = i.to_bytes(8, "big")
        if distinct_tools:
            for at in name_at:
                copy[at : at + 11] = f"tool-{i:06d}".encode()
        parts.append(_field(2, bytes(copy)))
    scope = b"".join(parts)
    return _field(1, _field(1, resource) + _field(2, scope))
