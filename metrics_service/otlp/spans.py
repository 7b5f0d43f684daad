"""MCP spans -> the events a posted ``tool_execution`` (and ``protocol_latency``) would be.

The mapping and the OpenTelemetry MCP semantic conventions' error rules are in docs/otlp.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metrics_service.errors import Forbidden, PayloadTooLarge
from metrics_service.otlp.decode import ResourceSpans, Span
from metrics_service.validation import Batch

if TYPE_CHECKING:
    from metrics_service.app import AppState

SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
STATUS_ERROR = 2
#: JSON-RPC codes a server SHOULD NOT count as errors (the caller's mistake, semconv).
SERVER_NOT_ERRORS = frozenset({"-32700", "-32600", "-32601", "-32602", "-32002"})
HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
MAX_FLOWS = 10_000


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
