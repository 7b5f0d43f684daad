"""``POST /v1/traces`` as plain ASGI, read top to bottom like ``POST /metrics``: auth
(``X-API-Key`` or ``Authorization: Bearer``) -> rate limit -> content type and encoding -> body
(size-limited, gzip inflated under the same limit) -> decode -> spans to rows -> write queue
(commit) -> ``ExportTraceServiceResponse``. And the refusal of ``POST /v1/metrics``.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.types import Receive, Scope, Send

from metrics_service.api import ClientGone, admit, read_body
from metrics_service.errors import (
    ApiError,
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from metrics_service.otlp.decode import decode_json, decode_protobuf
from metrics_service.otlp.spans import map_spans
from metrics_service.validation import Batch

if TYPE_CHECKING:
    from metrics_service.app import AppState

log = logging.getLogger(__name__)

_PROTOBUF, _JSON = "application/x-protobuf", "application/json"
#: gRPC status codes of the google.rpc.Status body of a failed request (OTLP/HTTP).
_GRPC_CODE = {400: 3, 401: 16, 403: 7, 408: 4, 413: 8, 415: 3, 429: 8, 503: 14, 500: 13}


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
        principal, request, answer_headers = await admit(app, scope)
        encoding, length = request.encoding, request.length
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
            return 200, msgspec.json.encode(partial), answer_headers
        response = ExportTraceServiceResponse()
        if mapped.rejected:
            response.partial_success.rejected_spans = mapped.rejected
            response.partial_success.error_message = message
        return 200, response.SerializeToString(), answer_headers


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
