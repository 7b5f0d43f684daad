"""OTLP/HTTP trace ingest: ``POST /v1/traces``. MCP spans become ``tool_execution`` rows.

The path reads as ``POST /metrics`` does: auth (``X-API-Key`` or ``Authorization: Bearer``) ->
rate limit -> content type and encoding -> body (size-limited, gzip inflated under the same
limit) -> decode (``application/x-protobuf`` with ``opentelemetry-proto``, or OTLP/JSON) ->
spans mapped to events and validated by the rules of posted events -> write queue (commit) ->
``ExportTraceServiceResponse``. A span is an MCP span when it has ``mcp.method.name``; other
spans are counted and dropped. Mapping and error rules: docs/otlp.md, after the OpenTelemetry
MCP semantic conventions (semantic-conventions-genai ``model/mcp``, status Development).
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.types import Receive, Scope, Send

from metrics_service.api import ClientGone, read_body
from metrics_service.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
)
from metrics_service.validation import Batch

if TYPE_CHECKING:
    from metrics_service.app import AppState

log = logging.getLogger(__name__)

SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
STATUS_ERROR = 2
#: JSON-RPC codes a server SHOULD NOT count as errors (the caller's mistake, semconv).
SERVER_NOT_ERRORS = frozenset({"-32700", "-32600", "-32601", "-32602", "-32002"})
HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
MAX_FLOWS = 10_000
_PROTOBUF, _JSON = "application/x-protobuf", "application/json"
#: gRPC status codes of the google.rpc.Status body of a failed request (OTLP/HTTP).
_GRPC_CODE = {400: 3, 401: 16, 403: 7, 408: 4, 413: 8, 415: 3, 429: 8, 503: 14, 500: 13}


@dataclass(slots=True)
class Span:
    """One span, as either encoding gives it: ids in lower-case hex, times in ns."""

    trace_id: str
    span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any]


@dataclass(slots=True)
class ResourceSpans:
    attributes: dict[str, Any]
    spans: list[Span]


# -- decoding ---------------------------------------------------------------------------------


def _pb_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None or which in ("array_value", "kvlist_value"):
        return None  # no MCP attribute is structured; nested values are not kept
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _pb_attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in kvs}


def decode_protobuf(body: bytes) -> Iterator[ResourceSpans]:
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except DecodeError as exc:
        raise BadRequest(f"the body is not an OTLP ExportTraceServiceRequest: {exc}") from None
    for rs in request.resource_spans:
        spans = [
            Span(
                s.trace_id.hex(),
                s.span_id.hex(),
                s.name,
                s.kind,
                s.start_time_unix_nano,
                s.end_time_unix_nano,
                s.status.code,
                _pb_attributes(s.attributes),
            )
            for ss in rs.scope_spans
            for s in ss.spans
        ]
        yield ResourceSpans(_pb_attributes(rs.resource.attributes), spans)


# OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding): lowerCamelCase
# keys, ids as hex strings, 64-bit integers as decimal strings (numbers accepted too), enums as
# integers, unknown fields ignored.
class _JValue(msgspec.Struct):
    stringValue: str | None = None
    boolValue: bool | None = None
    intValue: int | str | None = None
    doubleValue: float | str | None = None
    bytesValue: str | None = None


class _JKeyValue(msgspec.Struct):
    key: str
    value: _JValue | None = None


class _JStatus(msgspec.Struct):
    code: int = 0


class _JSpan(msgspec.Struct):
    traceId: str = ""
    spanId: str = ""
    name: str = ""
    kind: int = 0
    startTimeUnixNano: int | str = 0
    endTimeUnixNano: int | str = 0
    attributes: list[_JKeyValue] = []
    status: _JStatus | None = None


class _JScopeSpans(msgspec.Struct):
    spans: list[_JSpan] = []


class _JResource(msgspec.Struct):
    attributes: list[_JKeyValue] = []


class _JResourceSpans(msgspec.Struct):
    resource: _JResource | None = None
    scopeSpans: list[_JScopeSpans] = []


class _JRequest(msgspec.Struct):
    resourceSpans: list[_JResourceSpans] = []


_json_request = msgspec.json.Decoder(_JRequest)


def _j_value(value: _JValue | None) -> Any:
    if value is None:
        return None
    if value.stringValue is not None:
        return value.stringValue
    if value.boolValue is not None:
        return value.boolValue
    if value.intValue is not None:
        return _int(value.intValue, "intValue")
    if value.doubleValue is not None:
        try:
            return float(value.doubleValue)
        except ValueError:
            shown = str(value.doubleValue)[:32]
            raise BadRequest(f"doubleValue {shown!r} is not a number") from None
    return value.bytesValue


def _j_attributes(kvs: list[_JKeyValue]) -> dict[str, Any]:
    return {kv.key: _j_value(kv.value) for kv in kvs}


def _int(value: int | str, name: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} {str(value)[:32]!r} is not an integer") from None


def _hex(value: str, size: int, name: str) -> str:
    if value and (len(value) != 2 * size or not _is_hex(value)):
        raise BadRequest(f"{name} must be {2 * size} hex digits (OTLP/JSON), got {value[:40]!r}")
    return value.lower()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def decode_json(body: bytes) -> Iterator[ResourceSpans]:
    try:
        request = _json_request.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the body is not OTLP/JSON traces: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    for rs in request.resourceSpans:
        spans = [
            Span(
                _hex(s.traceId, 16, "traceId"),
                _hex(s.spanId, 8, "spanId"),
                s.name,
                s.kind,
                _int(s.startTimeUnixNano, "startTimeUnixNano"),
                _int(s.endTimeUnixNano, "endTimeUnixNano"),
                s.status.code if s.status is not None else 0,
                _j_attributes(s.attributes),
            )
            for ss in rs.scopeSpans
            for s in ss.spans
        ]
        resource = _j_attributes(rs.resource.attributes) if rs.resource is not None else {}
        yield ResourceSpans(resource, spans)


# -- mapping ----------------------------------------------------------------------------------


def _str(value: Any) -> str | None:
    """A string attribute as stored: other scalars as their text (an int request id, say)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def transport_of(attributes: dict[str, Any]) -> str | None:
    """The stored transport (``stdio``, ``streamable-http``, ``sse``) from the semconv
    ``network.transport`` (``pipe``, ``tcp``, ``quic``) and protocol attributes."""
    network = _str(attributes.get("network.transport"))
    if network is None:
        return None
    if network == "pipe":
        return "stdio"
    if network in ("tcp", "quic"):
        protocol = _str(attributes.get("network.protocol.name"))
        if protocol == "websocket":
            return "websocket"
        version = _str(attributes.get("mcp.protocol.version"))
        # HTTP+SSE is the transport of 2024-11-05 and older (semconv transport table).
        if version is not None and version <= "2024-11-05":
            return "sse"
        return "streamable-http"
    return network


def failed(kind: int, error_type: str | None, status_code: int) -> bool:
    """The semconv error rules: a server does not count the caller's JSON-RPC mistakes
    (-32700, -32600, -32601, -32602 incl. unknown tool, -32002); a client counts every error."""
    if error_type is None:
        return status_code == STATUS_ERROR
    return not (kind == SPAN_KIND_SERVER and error_type in SERVER_NOT_ERRORS)


def tool_event(span: Span, resource: dict[str, Any]) -> dict[str, Any]:
    """The ``tool_execution`` event a posted event would carry for this MCP span."""
    a = span.attributes
    method = _str(a.get("mcp.method.name"))
    tool = _str(a.get("gen_ai.tool.name"))
    if tool is None and method == "tools/call":
        # The span name is "{mcp.method.name} {target}" (the SDK's client adds "MCP send ").
        head, _, target = span.name.rpartition("tools/call ")
        tool = (target or None) if head in ("", "MCP send ") else None
    error_type = _str(a.get("error.type"))
    if error_type is None and span.status_code == STATUS_ERROR:
        error_type = "_OTHER"
    client_side = span.kind == SPAN_KIND_CLIENT
    service = _str(resource.get("service.name"))
    dims: dict[str, Any] = {
        "method": method,
        "tool_name": tool,
        "success": not failed(span.kind, error_type, span.status_code),
        "server_name": _str(a.get("mcp.server.name"))
        or (_str(a.get("server.address")) if client_side else service),
        "client_name": _str(a.get("mcp.client.name")) or (service if client_side else None),
        "client_version": _str(a.get("mcp.client.version")),
        "transport": transport_of(a),
        "session_id": _str(a.get("mcp.session.id")),
        "protocol_version": _str(a.get("mcp.protocol.version")),
        "error_type": error_type,
    }
    if client_side:
        dims["span_kind"] = "client"
    meta: dict[str, Any] = {"trace_id": span.trace_id, "span_id": span.span_id}
    for target, key in (
        ("agent_id", "gen_ai.agent.id"),
        ("input_tokens", "gen_ai.usage.input_tokens"),
        ("output_tokens", "gen_ai.usage.output_tokens"),
    ):
        if (value := a.get(key)) is not None:
            meta[target] = value
    return {
        "type": "tool_execution",
        "duration_ms": (span.end_ns - span.start_ns) / 1e6,
        "timestamp": span.end_ns / 1e9,
        "dimensions": {k: v for k, v in dims.items() if v is not None},
        "metadata": meta,
    }


class _Flow:
    __slots__ = ("call_seen", "handshake_at", "handshake_method", "last_list_at", "list_seen")

    def __init__(self) -> None:
        self.handshake_at: int | None = None
        self.handshake_method: str | None = None
        self.last_list_at: int | None = None
        self.list_seen = False
        self.call_seen = False

    def copy(self) -> _Flow:
        flow = _Flow()
        for name in _Flow.__slots__:
            setattr(flow, name, getattr(self, name))
        return flow


class Flows:
    """Protocol-flow latency from server spans, once per flow, as the middleware derives it:
    handshake -> first tools/list -> first tools/call. A flow is a session (``mcp.session.id``),
    or a trace where the protocol is sessionless. State changes apply only once the request's
    rows are committed (``commit``), so a retried export derives the same steps again."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()
        self._max = max_flows

    def steps(
        self, service: str, spans: list[tuple[Span, dict[str, Any]]], updates: dict[Hashable, _Flow]
    ) -> list[dict[str, Any]]:
        """The protocol_latency events of ``spans`` (server MCP spans with their tool event)."""
        events: list[dict[str, Any]] = []
        for span, event in sorted(spans, key=lambda pair: pair[0].start_ns):
            dims = event["dimensions"]
            method = dims.get("method")
            if not (method in HANDSHAKE_METHODS or method in ("tools/list", "tools/call")):
                continue
            session = dims.get("session_id")
            key = (service, "session", session) if session else (service, "trace", span.trace_id)
            flow = updates.get(key)
            if flow is None:
                known = self._flows.get(key)
                flow = updates[key] = known.copy() if known is not None else _Flow()
            at = span.start_ns
            found: list[tuple[str, int]] = []
            if method in HANDSHAKE_METHODS:
                if flow.handshake_at is None:
                    flow.handshake_at, flow.handshake_method = at, method
            elif method == "tools/list":
                if not flow.list_seen:
                    flow.list_seen = True
                    if flow.handshake_at is not None:
                        found.append(("initialize->tools/list", at - flow.handshake_at))
                if not flow.call_seen:
                    flow.last_list_at = at
            elif not flow.call_seen:
                flow.call_seen = True
                if flow.last_list_at is not None:
                    found.append(("tools/list->tools/call", at - flow.last_list_at))
                if flow.handshake_at is not None:
                    found.append(("initialize->tools/call", at - flow.handshake_at))
            for step, ns in found:
                step_dims = {
                    "flow_step": step,
                    "server_name": dims.get("server_name"),
                    "client_name": dims.get("client_name"),
                    "session_id": session,
                    "transport": dims.get("transport"),
                }
                events.append(
                    {
                        "type": "protocol_latency",
                        "duration_ms": max(ns, 0) / 1e6,
                        "timestamp": span.end_ns / 1e9,
                        "dimensions": {k: v for k, v in step_dims.items() if v is not None},
                        "metadata": {"handshake_method": flow.handshake_method}
                        if flow.handshake_method
                        else {},
                    }
                )
        return events

    def commit(self, updates: dict[Hashable, _Flow]) -> None:
        flows = self._flows
        for key, flow in updates.items():
            flows[key] = flow
            flows.move_to_end(key)
        while len(flows) > self._max:
            flows.popitem(last=False)


@dataclass(slots=True)
class Mapped:
    batch: Batch
    spans: int
    not_mcp: int
    rejected: int
    flow_updates: dict[Hashable, _Flow]


def map_spans(app: AppState, resources: Iterator[ResourceSpans], service: str) -> Mapped:
    """Spans -> a batch of rows for ``service`` (the key's). Raises 403 for MCP spans of
    another service, 413 past the span limit."""
    limit = app.settings.otlp_max_spans_per_request
    batch = Batch(service=service)
    updates: dict[Hashable, _Flow] = {}
    total = not_mcp = rejected = 0
    for rs in resources:
        first = total
        total += len(rs.spans)
        if total > limit:
            raise PayloadTooLarge(
                f"more than {limit} spans in one request"
                " (METRICS_OTLP_MAX_SPANS_PER_REQUEST): export smaller batches"
            )
        mcp = [
            (first + i, s)
            for i, s in enumerate(rs.spans)
            if s.attributes.get("mcp.method.name") is not None
        ]
        not_mcp += len(rs.spans) - len(mcp)
        if not mcp:
            continue
        named = _str(rs.attributes.get("service.name"))
        if named is not None and named != service and not named.startswith("unknown_service"):
            app.telemetry.add("metrics_service_auth_failures", ("wrong_service",))
            raise Forbidden(
                f"this key was not issued for service {named[:64]!r} (resource service.name)"
            )
        resource = {**rs.attributes, "service.name": service}
        head = (
            service,
            (_str(rs.attributes.get("service.version")) or "")[:64],
            _str(rs.attributes.get("service.instance.id")),
        )
        events = [(index, span, tool_event(span, resource)) for index, span in mcp]
        before = len(batch.rejections)
        app.validator.add_items(batch, head, [(index, event) for index, _, event in events])
        refused = {r.index for r in batch.rejections[before:]}
        rejected += len(refused)
        servers = [
            (span, event)
            for index, span, event in events
            if span.kind == SPAN_KIND_SERVER and index not in refused
        ]
        if servers:
            steps = app.flows.steps(service, servers, updates)
            # Flow steps are derived, not sent: one that fails validation (a negative gap from
            # skewed clocks, say) is dropped, never reported as a rejected span.
            kept = len(batch.rejections)
            app.validator.add_items(batch, head, [(-1, e) for e in steps])
            del batch.rejections[kept:]
    if batch.accepted > app.settings.queue_max_metrics:
        # It could never fit the write queue: 503 would have the exporter retry it forever.
        raise PayloadTooLarge(
            f"{batch.accepted} MCP spans are more than the write queue holds"
            f" (METRICS_QUEUE_MAX_METRICS={app.settings.queue_max_metrics}): export smaller batches"
        )
    return Mapped(batch, total, not_mcp, rejected, updates)


# -- the endpoint -----------------------------------------------------------------------------


def _status_body(grpc_code: int, message: str) -> bytes:
    """A google.rpc.Status in protobuf: code (field 1, varint), message (field 2)."""
    text = message.encode()
    return b"\x08" + _varint(grpc_code) + b"\x12" + _varint(len(text)) + text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def inflate(body: bytes, limit: int) -> bytes:
    """gunzip ``body``, refusing (413) output beyond ``limit`` bytes as soon as it is reached."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid gzip: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body is larger than {limit} bytes")
    if not inflater.eof:
        raise BadRequest("the gzip body is truncated")
    return out


class TracesEndpoint:
    """``POST /v1/traces`` (and the refusal of ``POST /v1/metrics``) as plain ASGI."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app: AppState = scope["app"].state.metrics
        rid = str(scope.get("request_id", ""))
        as_json = _content_type(scope) == _JSON
        try:
            if scope["path"] == "/v1/metrics":
                raise _metrics_refused()
            status, body, headers = await self.export(app, scope, receive, as_json)
        except ApiError as error:
            status, headers = error.status, error.headers
            if error.status == 500:
                log.error("OTLP export failed: %s", error.message)
            body = _error(error, rid, as_json)
        except ClientGone:
            return
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            status, headers = 500, {}
            body = _error(ApiError("internal error"), rid, as_json)
        raw_headers = [
            (b"content-type", (_JSON if as_json else _PROTOBUF).encode()),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def export(
        app: AppState, scope: Scope, receive: Receive, as_json: bool
    ) -> tuple[int, bytes, dict[str, str]]:
        api_key = encoding = length = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = api_key or value.decode("latin-1")
            elif name == b"authorization" and api_key is None:
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    api_key = token.strip()
            elif name == b"content-encoding":
                encoding = encoding or value.strip().lower()
            elif name == b"content-length":
                length = length or value
        client = scope.get("client")
        principal = await app.authenticator.authenticate(
            api_key, client[0] if client else "unknown", "ingest"
        )
        decision = await app.limiter.hit(
            "key",
            str(principal.key_id),
            principal.rate_limit_per_min or app.settings.rate_limit_per_min,
        )
        if not decision.allowed:
            app.telemetry.add("metrics_service_rate_limited_requests")
            raise RateLimited("rate limit exceeded for this key", headers=decision.headers())
        kind = _content_type(scope)
        if kind not in (_PROTOBUF, _JSON):
            raise UnsupportedMediaType(
                "Content-Type must be application/x-protobuf or application/json (OTLP/HTTP)"
            )
        if encoding not in (None, b"", b"identity", b"gzip"):
            raise UnsupportedMediaType("Content-Encoding must be gzip or identity")
        limit = app.settings.max_request_bytes
        body = await read_body(receive, length, limit, app.settings.request_timeout_s)
        if encoding == b"gzip":
            body = inflate(body, limit)
        assert principal.service is not None  # an ingest key always names its service
        resources = decode_json(body) if kind == _JSON else decode_protobuf(body)
        mapped = map_spans(app, resources, principal.service)
        batch = mapped.batch
        await app.queue.submit(batch)  # durable acknowledgement: returns once committed
        app.flows.commit(mapped.flow_updates)
        app.telemetry.on_spans(
            accepted=mapped.spans - mapped.not_mcp - mapped.rejected,
            rejected=mapped.rejected,
            not_mcp=mapped.not_mcp,
        )
        app.on_ingested(batch)
        message = _rejections_message(batch, mapped.rejected)
        if as_json:
            partial = (
                {"partialSuccess": {"rejectedSpans": str(mapped.rejected), "errorMessage": message}}
                if mapped.rejected
                else {}
            )
            return 200, msgspec.json.encode(partial), decision.headers()
        response = ExportTraceServiceResponse()
        if mapped.rejected:
            response.partial_success.rejected_spans = mapped.rejected
            response.partial_success.error_message = message
        return 200, response.SerializeToString(), decision.headers()


def _metrics_refused() -> ApiError:
    error = BadRequest(
        "OTLP metrics are not accepted: MCP semconv histograms are aggregates, and this service "
        "stores one row per MCP operation. Export spans to /v1/traces (or post events to "
        "/metrics), and send OTLP metrics to a metrics backend."
    )
    error.code = "otlp_metrics_not_accepted"
    return error


def _rejections_message(batch: Batch, rejected: int) -> str:
    if not rejected:
        return ""
    shown = "; ".join(f"{r.field}: {r.rule} ({r.message})" for r in batch.rejections[:5])
    more = f"; and {len(batch.rejections) - 5} more" if len(batch.rejections) > 5 else ""
    return f"{rejected} span(s) rejected: {shown}{more}"


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.split(b";", 1)[0].strip().lower().decode("latin-1"))
    return None


def _error(error: ApiError, rid: str, as_json: bool) -> bytes:
    code = _GRPC_CODE.get(error.status, 2)
    if not as_json:
        return _status_body(code, error.message)
    return msgspec.json.encode(
        {
            "code": code,
            "message": error.message,
            "details": [],
            "error": {"code": error.code, "message": error.message, "details": error.details},
            "request_id": rid,
        }
    )


TRACES = TracesEndpoint()
__all__ = ["TRACES", "Flows", "decode_json", "decode_protobuf", "failed", "tool_event"]
