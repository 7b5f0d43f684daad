"""Decoding ``ExportTraceServiceRequest`` bodies, protobuf or OTLP/JSON, into plain spans.

Protobuf goes through the official ``opentelemetry-proto`` messages (upb), read the cheap way
(``_RawRequest``); OTLP/JSON through typed msgspec structs after
https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding. A body that does not decode
raises ``BadRequest`` (400): nothing of it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from metrics_service.errors import BadRequest


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
    #: The spans' TEXT_KEYS attributes are text (or None), as ``as_text`` gives them.
    text: bool = False


#: The attributes the mapping reads (docs/otlp.md's table): spans.py looks at no other, so by
#: default decoding keeps only these and does not read the others' values (reading a value is
#: most of a span's decoding cost). ``keep=None`` keeps every attribute.
SPAN_KEYS = frozenset(
    {
        "mcp.method.name",
        "gen_ai.tool.name",
        "error.type",
        "mcp.server.name",
        "server.address",
        "mcp.client.name",
        "mcp.client.version",
        "network.transport",
        "network.protocol.name",
        "mcp.protocol.version",
        "mcp.session.id",
        "gen_ai.agent.id",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
    }
)
RESOURCE_KEYS = frozenset({"service.name", "service.version", "service.instance.id"})
#: The span attributes the mapping reads as text (``as_text``); decoding with ``MAPPED`` gives
#: them so, once per distinct value (the others, metadata, are kept as sent).
TEXT_KEYS = SPAN_KEYS - {
    "gen_ai.agent.id",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
}
#: (span attribute keys, resource attribute keys) to keep, or None for all.
Keep = tuple[frozenset[str], frozenset[str]] | None
MAPPED: Keep = (SPAN_KEYS, RESOURCE_KEYS)


def as_text(value: Any) -> str | None:
    """A string attribute as stored: other scalars as their text (an int request id, say)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pb_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None or which in ("array_value", "kvlist_value"):
        return None  # no MCP attribute is structured; nested values are not kept
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _pb_attributes(kvs: Any, keys: frozenset[str] | None) -> dict[str, Any]:
    if keys is None:
        return {kv.key: _pb_value(kv.value) for kv in kvs}
    out: dict[str, Any] = {}
    for kv in kvs:
        key = kv.key
        if key in keys:
            value = kv.value
            # A non-empty string_value is the oneof's member: one read instead of two.
            found = value.string_value or _pb_value(value)
            out[key] = as_text(found) if key in TEXT_KEYS else found
    return out


def _raw_attributes_request() -> Any:
    """``ExportTraceServiceRequest`` with ``Span.attributes`` and ``Resource.attributes`` as
    ``repeated bytes``: the official descriptors, copied, with only those two fields changed.
    Bytes and messages share a wire type, so it parses every body the official message parses,
    to the same values, but hands each KeyValue over as its serialized bytes, not as a message
    object (reading a KeyValue through upb's objects costs about 0.5 us; most spans repeat the
    same few KeyValues, which ``_RawDecoder`` parses once per request)."""
    pool = descriptor_pool.DescriptorPool()
    raw = {
        ("opentelemetry.proto.resource.v1", "Resource"),
        ("opentelemetry.proto.trace.v1", "Span"),
    }
    for module in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        for message in proto.message_type:
            if (proto.package, message.name) in raw:
                for f in message.field:
                    if f.name == "attributes":
                        f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                        f.ClearField("type_name")
        pool.Add(proto)
    name = ExportTraceServiceRequest.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


_RawRequest = _raw_attributes_request()
_SKIP = (None, None)


class _Unusual(Exception):
    """The raw read cannot vouch for this body: the official parse decides."""


class _RawDecoder:
    """KeyValue bytes -> (key, value), each distinct KeyValue parsed once per request with the
    official message (which checks it as the whole-body parse would)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[str | None, Any]] = {}

    def attributes(self, kvs: Any, keys: frozenset[str]) -> dict[str, Any]:
        seen = self._seen
        out: dict[str, Any] = {}
        for raw in kvs:
            hit = seen.get(raw)
            if hit is None:
                hit = seen[raw] = self._parse(raw, keys)
            key = hit[0]
            if key is not None:
                out[key] = hit[1]
        return out

    @staticmethod
    def _parse(raw: bytes, keys: frozenset[str]) -> tuple[str | None, Any]:
        kv = common_pb2.KeyValue.FromString(raw)  # DecodeError: the official parse decides
        value = kv.value
        which = value.WhichOneof("value")
        if which in ("array_value", "kvlist_value"):
            # Nested values: upb's depth limit counts from the body's root, not the KeyValue's.
            raise _Unusual
        if kv.key not in keys:
            return _SKIP
        found = _pb_value(value)
        return kv.key, as_text(found) if kv.key in TEXT_KEYS else found


def _decode_raw(body: bytes, span_keys: frozenset[str], resource_keys: frozenset[str]) -> Any:
    request = _RawRequest.FromString(body)
    spans_decoder, resources_decoder = _RawDecoder(), _RawDecoder()
    attributes = spans_decoder.attributes
    return [
        ResourceSpans(
            resources_decoder.attributes(rs.resource.attributes, resource_keys),
            _spans(rs, lambda kvs: attributes(kvs, span_keys)),
            True,
        )
        for rs in request.resource_spans
    ]


def _spans(rs: Any, attributes: Callable[[Any], dict[str, Any]]) -> list[Span]:
    """The spans of one protobuf ``ResourceSpans``, their attributes read by ``attributes``
    (the raw reader or the official messages')."""
    return [
        Span(
            s.trace_id.hex(),
            s.span_id.hex(),
            s.name,
            s.kind,
            s.start_time_unix_nano,
            s.end_time_unix_nano,
            s.status.code,
            attributes(s.attributes),
        )
        for ss in rs.scope_spans
        for s in ss.spans
    ]


def decode_protobuf(body: bytes, keep: Keep = MAPPED) -> Iterator[ResourceSpans]:
    if keep is not None:
        # Whole, before any resource is mapped: a body that does not decode is a 400 before
        # anything else is checked, as with the official parse of the whole body.
        try:
            decoded = _decode_raw(body, *keep)
        except (DecodeError, _Unusual):
            pass
        else:
            yield from decoded
            return
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except DecodeError as exc:
        raise BadRequest(f"the body is not an OTLP ExportTraceServiceRequest: {exc}") from None
    span_keys, resource_keys = keep if keep is not None else (None, None)
    for rs in request.resource_spans:
        spans = _spans(rs, lambda kvs: _pb_attributes(kvs, span_keys))
        yield ResourceSpans(
            _pb_attributes(rs.resource.attributes, resource_keys), spans, keep is not None
        )


# OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding): lowerCamelCase
# keys, ids as hex strings, 64-bit integers as decimal strings (numbers accepted too), enums as
# integers, unknown fields ignored.
class _JValue(msgspec.Struct, gc=False):
    stringValue: str | None = None
    boolValue: bool | None = None
    intValue: int | str | None = None
    doubleValue: float | str | None = None
    bytesValue: str | None = None


class _JKeyValue(msgspec.Struct, gc=False):
    key: str
    value: _JValue | None = None


class _JStatus(msgspec.Struct, gc=False):
    code: int = 0


class _JSpan(msgspec.Struct, gc=False):
    traceId: str = ""
    spanId: str = ""
    name: str = ""
    kind: int = 0
    startTimeUnixNano: int | str = 0
    endTimeUnixNano: int | str = 0
    attributes: list[_JKeyValue] = []
    status: _JStatus | None = None


class _JScopeSpans(msgspec.Struct, gc=False):
    spans: list[_JSpan] = []


class _JResource(msgspec.Struct, gc=False):
    attributes: list[_JKeyValue] = []


class _JResourceSpans(msgspec.Struct, gc=False):
    resource: _JResource | None = None
    scopeSpans: list[_JScopeSpans] = []


class _JRequest(msgspec.Struct, gc=False):
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


def _j_attributes(kvs: list[_JKeyValue], keys: frozenset[str] | None) -> dict[str, Any]:
    if keys is None:
        return {kv.key: _j_value(kv.value) for kv in kvs}
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        if value is None:
            if kv.key in keys:
                out[kv.key] = None
            continue
        text = value.stringValue
        if kv.key in keys:
            if text is None:
                text = _j_value(value)
                if kv.key in TEXT_KEYS:
                    text = as_text(text)
            out[kv.key] = text
        elif text is None:
            _j_value(value)  # not kept, but a value that is not a number is still a 400
    return out


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


def decode_json(body: bytes, keep: Keep = MAPPED) -> Iterator[ResourceSpans]:
    try:
        request = _json_request.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the body is not OTLP/JSON traces: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    span_keys, resource_keys = keep if keep is not None else (None, None)
    for rs in request.resourceSpans:
        spans = _j_spans(rs, span_keys) if keep is not None else _j_spans_general(rs)
        resource = (
            _j_attributes(rs.resource.attributes, resource_keys) if rs.resource is not None else {}
        )
        yield ResourceSpans(resource, spans, keep is not None)


def _j_spans_general(rs: _JResourceSpans) -> list[Span]:
    """Every field through its helper, every attribute kept: what ``_j_spans`` must match."""
    return [
        Span(
            _hex(s.traceId, 16, "traceId"),
            _hex(s.spanId, 8, "spanId"),
            s.name,
            s.kind,
            _int(s.startTimeUnixNano, "startTimeUnixNano"),
            _int(s.endTimeUnixNano, "endTimeUnixNano"),
            s.status.code if s.status is not None else 0,
            _j_attributes(s.attributes, None),
        )
        for ss in rs.scopeSpans
        for s in ss.spans
    ]


def _j_spans(rs: _JResourceSpans, keys: frozenset[str] | None) -> list[Span]:
    fromhex = bytes.fromhex
    spans = []
    for ss in rs.scopeSpans:
        for s in ss.spans:
            trace, span_id = s.traceId, s.spanId
            start, end = s.startTimeUnixNano, s.endTimeUnixNano
            # The common case inline; anything else through the helpers, which raise the
            # error of the first bad field.
            try:
                if (trace and len(trace) != 32) or (span_id and len(span_id) != 16):
                    raise ValueError
                fromhex(trace)
                fromhex(span_id)
                start, end = int(start), int(end)
            except ValueError:
                trace, span_id = _hex(trace, 16, "traceId"), _hex(span_id, 8, "spanId")
                start = _int(start, "startTimeUnixNano")
                end = _int(end, "endTimeUnixNano")
            spans.append(
                Span(
                    trace.lower(),
                    span_id.lower(),
                    s.name,
                    s.kind,
                    start,
                    end,
                    s.status.code if s.status is not None else 0,
                    _j_attributes(s.attributes, keys),
                )
            )
    return spans
