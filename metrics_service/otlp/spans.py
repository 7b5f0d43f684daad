"""MCP spans -> the events a posted ``tool_execution`` (and ``protocol_latency``) would be.

The mapping and the OpenTelemetry MCP semantic conventions' error rules are in docs/otlp.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from metrics_service.errors import Forbidden, PayloadTooLarge
from metrics_service.otlp.decode import ResourceSpans, Span, as_text
from metrics_service.storage import schema
from metrics_service.validation import (
    MAX_COUNT,
    MAX_DURATION_MS,
    MCP_METHODS,
    Batch,
)

if TYPE_CHECKING:
    from metrics_service.app import AppState

SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
STATUS_ERROR = 2
#: JSON-RPC codes a server SHOULD NOT count as errors (the caller's mistake, semconv).
SERVER_NOT_ERRORS = frozenset({"-32700", "-32600", "-32601", "-32602", "-32002"})
HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
MAX_FLOWS = 10_000


def transport_of(attributes: dict[str, Any]) -> str | None:
    """The stored transport (``stdio``, ``streamable-http``, ``sse``) from the semconv
    ``network.transport`` (``pipe``, ``tcp``, ``quic``) and protocol attributes."""
    network = as_text(attributes.get("network.transport"))
    if network is None:
        return None
    if network == "pipe":
        return "stdio"
    if network in ("tcp", "quic"):
        protocol = as_text(attributes.get("network.protocol.name"))
        if protocol == "websocket":
            return "websocket"
        version = as_text(attributes.get("mcp.protocol.version"))
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
    method = as_text(a.get("mcp.method.name"))
    tool = as_text(a.get("gen_ai.tool.name"))
    if tool is None and method == "tools/call":
        # The span name is "{mcp.method.name} {target}" (the SDK's client adds "MCP send ").
        head, _, target = span.name.rpartition("tools/call ")
        tool = (target or None) if head in ("", "MCP send ") else None
    error_type = as_text(a.get("error.type"))
    if error_type is None and span.status_code == STATUS_ERROR:
        error_type = "_OTHER"
    client_side = span.kind == SPAN_KIND_CLIENT
    service = as_text(resource.get("service.name"))
    dims: dict[str, Any] = {
        "method": method,
        "tool_name": tool,
        "success": not failed(span.kind, error_type, span.status_code),
        "server_name": as_text(a.get("mcp.server.name"))
        or (as_text(a.get("server.address")) if client_side else service),
        "client_name": as_text(a.get("mcp.client.name")) or (service if client_side else None),
        "client_version": as_text(a.get("mcp.client.version")),
        "transport": transport_of(a),
        "session_id": as_text(a.get("mcp.session.id")),
        "protocol_version": as_text(a.get("mcp.protocol.version")),
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


#: The ``tool_execution`` row layout ``_direct_row`` writes; the direct path is off (and
#: tests/test_otlp_fastpath.py fails) if the schema's differs.
_ROW_LAYOUT = (
    "ts",
    "received_at",
    "service",
    "service_version",
    "instance_id",
    "value",
    "duration_ms",
    "method",
    "tool_name",
    "server_name",
    "client_name",
    "client_version",
    "success",
    "input_size_bytes",
    "output_size_bytes",
    "transport",
    "session_id",
    "server_path",
    "user_hash",
    "error_code",
    "protocol_version",
    "error_type",
    "agent_id",
    "tenant_id",
    "input_tokens",
    "output_tokens",
    "trace_id",
    "span_id",
    "dimensions",
    "metadata",
)
DIRECT_LAYOUT = tuple(schema.row_positions("tool_execution")) == _ROW_LAYOUT
#: The most dimensions ``tool_event`` makes (every column it fills, and span_kind).
_MOST_DIMENSIONS = 11
_NOT_TOOLS = MCP_METHODS - {"tools/call"}
_CLIENT_DIMENSIONS = '{"span_kind":"client"}'
_encode = msgspec.json.Encoder().encode
_POS = schema.row_positions("tool_execution")
_METHOD, _SESSION, _SERVER, _CLIENT, _TRANSPORT = (
    _POS[name] for name in ("method", "session_id", "server_name", "client_name", "transport")
)

#: (received unix ms, oldest and newest event time accepted in unix s, max string length,
#: max metadata bytes): what one request's direct rows are checked against.
_Limits = tuple[int, float, float, int, int]


def _limits(app: AppState) -> _Limits | None:
    """The validator's window and the settings' limits, or None when the direct path cannot
    take this app's spans (a schema it was not written for, fewer dimensions allowed than a
    span can make)."""
    s = app.settings
    if not DIRECT_LAYOUT or s.max_dimensions < _MOST_DIMENSIONS:
        return None
    received_ms, oldest_s, newest_s = app.validator.window()
    return (
        received_ms,
        oldest_s,
        newest_s,
        s.max_string_length,
        s.max_metadata_bytes,
    )


def _direct_row(
    span: Span, service: str, head: tuple[str, str, str | None], limits: _Limits
) -> tuple[Any, ...] | None:
    """The row ``Validator.add_items`` makes of ``tool_event(span, ...)``, built directly, for
    the common case only: None, and the general path decides, for anything that it could
    reject (a string too long or holding U+0000, a time outside the window, a negative or
    too long duration, a tools/call naming no tool, a metadata value of the wrong type, too
    much metadata). So the validator stays the one place that rejects, and what this returns
    is what it would have built (tests/test_otlp_fastpath.py compares the two)."""
    received_ms, oldest_s, newest_s, max_len, max_meta = limits
    _, version, instance = head
    start, end = span.start_ns, span.end_ns
    duration = (end - start) / 1e6
    ts = end / 1e9
    if not (0 <= duration <= MAX_DURATION_MS and oldest_s <= ts <= newest_s):
        return None
    attributes = span.attributes
    get = attributes.get
    # The text attributes are text already (ResourceSpans.text).
    method = get("mcp.method.name")
    tool = get("gen_ai.tool.name")
    if tool is None and method == "tools/call":
        name_head, _, target = span.name.rpartition("tools/call ")
        tool = (target or None) if name_head in ("", "MCP send ") else None
    status = span.status_code
    error_type = get("error.type")
    if error_type is None and status == STATUS_ERROR:
        error_type = "_OTHER"
    kind = span.kind
    client_side = kind == SPAN_KIND_CLIENT
    server_name = get("mcp.server.name")
    if not server_name:
        server_name = get("server.address") if client_side else service
    client_name = get("mcp.client.name")
    if not client_name:
        client_name = service if client_side else None
    client_version = get("mcp.client.version")
    network = get("network.transport")
    transport = (
        "stdio" if network == "pipe" else None if network is None else transport_of(attributes)
    )
    session = get("mcp.session.id")
    protocol = get("mcp.protocol.version")
    # Unrolled (a loop over a tuple costs a third more): each string column within the
    # length limit and free of U+0000.
    if (
        method is None  # not an MCP span: never here
        or len(method) > max_len
        or "\x00" in method
        or (tool is not None and (len(tool) > max_len or "\x00" in tool))
        or (server_name is not None and (len(server_name) > max_len or "\x00" in server_name))
        or (client_name is not None and (len(client_name) > max_len or "\x00" in client_name))
        or (
            client_version is not None
            and (len(client_version) > max_len or "\x00" in client_version)
        )
        or (transport is not None and (len(transport) > max_len or "\x00" in transport))
        or (session is not None and (len(session) > max_len or "\x00" in session))
        or (protocol is not None and (len(protocol) > max_len or "\x00" in protocol))
        or (error_type is not None and (len(error_type) > max_len or "\x00" in error_type))
    ):
        return None
    # Validator._complete: an MCP method other than tools/call in the tool name names no tool.
    if tool and tool in _NOT_TOOLS and method == tool:
        tool = None
    if method == "tools/call" and not tool:
        return None
    agent = get("gen_ai.agent.id")
    inputs = get("gen_ai.usage.input_tokens")
    outputs = get("gen_ai.usage.output_tokens")
    if agent is None and inputs is None and outputs is None:
        # Hex ids (or empty): nothing to escape.
        meta = f'{{"trace_id":"{span.trace_id}","span_id":"{span.span_id}"}}'
    else:
        if agent is not None and (agent.__class__ is not str or "\x00" in agent):
            return None
        for count in (inputs, outputs):
            if count is not None and not (count.__class__ is int and 0 <= count <= MAX_COUNT):
                return None
        extra: dict[str, Any] = {"trace_id": span.trace_id, "span_id": span.span_id}
        if agent is not None:
            extra["agent_id"] = agent
        if inputs is not None:
            extra["input_tokens"] = inputs
        if outputs is not None:
            extra["output_tokens"] = outputs
        meta = _encode(extra).decode()
    if len(meta) > max_meta:
        return None
    if error_type is None:
        ok = status != STATUS_ERROR
    else:
        ok = kind == SPAN_KIND_SERVER and error_type in SERVER_NOT_ERRORS
    return (
        int(ts * 1000),
        received_ms,
        service,
        version,
        instance,
        1.0,
        duration,
        method,
        tool,
        server_name,
        client_name,
        client_version,
        1 if ok else 0,
        None,
        None,
        transport,
        session,
        None,
        None,
        None,
        protocol,
        error_type,
        agent,
        None,
        inputs,
        outputs,
        span.trace_id,
        span.span_id,
        _CLIENT_DIMENSIONS if client_side else None,
        meta,
    )


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


_FLOW_METHODS = HANDSHAKE_METHODS | {"tools/list", "tools/call"}


def _start(pair: tuple[Span, tuple[Any, ...]]) -> int:
    return pair[0].start_ns


class Flows:
    """Protocol-flow latency from server spans, once per flow, as the middleware derives it:
    handshake -> first tools/list -> first tools/call. A flow is a session (``mcp.session.id``),
    or a trace where the protocol is sessionless. State changes apply only once the request's
    rows are committed (``commit``), so a retried export derives the same steps again."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()
        self._max = max_flows

    def steps(
        self,
        service: str,
        spans: list[tuple[Span, tuple[Any, ...]]],
        updates: dict[Hashable, _Flow],
    ) -> list[dict[str, Any]]:
        """The protocol_latency events of ``spans`` (server MCP spans with their stored
        ``tool_execution`` row)."""
        events: list[dict[str, Any]] = []
        known_flows, m_at, s_at, flow_methods = self._flows, _METHOD, _SESSION, _FLOW_METHODS
        for span, row in sorted(spans, key=_start):
            method = row[m_at]
            if method not in flow_methods:
                continue
            session = row[s_at]
            key = (service, "session", session) if session else (service, "trace", span.trace_id)
            flow = updates.get(key)
            if flow is None:
                known = known_flows.get(key)
                flow = updates[key] = known.copy() if known is not None else _Flow()
            found: list[tuple[str, int]]
            if method == "tools/call":
                if flow.call_seen:  # the common case: nothing more to derive
                    continue
                flow.call_seen = True
                at = span.start_ns
                found = []
                if flow.last_list_at is not None:
                    found.append(("tools/list->tools/call", at - flow.last_list_at))
                if flow.handshake_at is not None:
                    found.append(("initialize->tools/call", at - flow.handshake_at))
            elif method == "tools/list":
                at = span.start_ns
                found = []
                if not flow.list_seen:
                    flow.list_seen = True
                    if flow.handshake_at is not None:
                        found.append(("initialize->tools/list", at - flow.handshake_at))
                if not flow.call_seen:
                    flow.last_list_at = at
            else:  # a handshake
                if flow.handshake_at is None:
                    flow.handshake_at, flow.handshake_method = span.start_ns, method
                continue
            for step, ns in found:
                step_dims = {
                    "flow_step": step,
                    "server_name": row[_SERVER],
                    "client_name": row[_CLIENT],
                    "session_id": session,
                    "transport": row[_TRANSPORT],
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


def map_spans(
    app: AppState, resources: Iterator[ResourceSpans], service: str, *, direct: bool = True
) -> Mapped:
    """Spans -> a batch of rows for ``service`` (the key's). Raises 403 for MCP spans of
    another service, 413 past the span limit. ``direct=False`` maps every span through
    ``tool_event`` and ``Validator.add_items`` (the general path, which the direct one must
    match exactly)."""
    limit = app.settings.otlp_max_spans_per_request
    validator = app.validator
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
        named = as_text(rs.attributes.get("service.name"))
        if named is not None and named != service and not named.startswith("unknown_service"):
            app.telemetry.add("metrics_service_auth_failures", ("wrong_service",))
            raise Forbidden(
                f"this key was not issued for service {named[:64]!r} (resource service.name)"
            )
        head = (
            service,
            (as_text(rs.attributes.get("service.version")) or "")[:64],
            as_text(rs.attributes.get("service.instance.id")),
        )
        limits = _limits(app) if direct and rs.text else None
        # One row per MCP span, None where the general path decides (it adds the rows it keeps
        # in order, so they fill those places in order).
        rows: list[tuple[Any, ...] | None]
        if limits is not None:
            rows = [_direct_row(span, service, head, limits) for _, span in mcp]
        else:
            rows = [None] * len(mcp)
        general = [
            (index, span) for (index, span), row in zip(mcp, rows, strict=True) if row is None
        ]
        refused: set[int] = set()
        if general:
            resource = {**rs.attributes, "service.name": service}
            checked = Batch(service=service)
            validator.add_items(
                checked, head, [(index, tool_event(span, resource)) for index, span in general]
            )
            refused = {r.index for r in checked.rejections}
            batch.rejections += checked.rejections
            rejected += len(refused)
            kept = iter(checked.rows.get("tool_execution", ()))
            rows = [
                row if row is not None else None if index in refused else next(kept)
                for (index, _), row in zip(mcp, rows, strict=True)
            ]
        tool_rows = [row for row in rows if row is not None]
        if tool_rows:
            bucket = batch.rows.get("tool_execution")
            if bucket is None:
                batch.rows["tool_execution"] = tool_rows
            else:
                bucket += tool_rows
        servers = [
            (span, row)
            for (_, span), row in zip(mcp, rows, strict=True)
            if row is not None and span.kind == SPAN_KIND_SERVER
        ]
        if servers:
            steps = app.flows.steps(service, servers, updates)
            # Flow steps are derived, not sent: one that fails validation (a negative gap from
            # skewed clocks, say) is dropped, never reported as a rejected span.
            kept_rejections = len(batch.rejections)
            validator.add_items(batch, head, [(-1, e) for e in steps])
            del batch.rejections[kept_rejections:]
    if batch.accepted > app.settings.queue_max_metrics:
        # It could never fit the write queue: 503 would have the exporter retry it forever.
        raise PayloadTooLarge(
            f"{batch.accepted} MCP spans are more than the write queue holds"
            f" (METRICS_QUEUE_MAX_METRICS={app.settings.queue_max_metrics}): export smaller batches"
        )
    return Mapped(batch, total, not_mcp, rejected, updates)
