"""The protocol flow of one MCP session, shared by the in-process instrumentation and the
wrap/proxy observer: which `protocol_latency` steps a request completes, and the JSON-RPC codes a
server does not count as its own errors.

A session yields each step at most once: `initialize->tools/list` at its first tools/list,
`tools/list->tools/call` (from the last tools/list before it) and `initialize->tools/call` at its
first tools/call. "initialize" names the handshake in step names whichever method carried it (the
2026-07-28 protocol opens with server/discover); the real method is kept as `handshake_method`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .events import PROTOCOL_LATENCY
from .recorder import Recorder

__all__ = ["FLOW_METHODS", "HANDSHAKE_METHODS", "SERVER_NOT_ERRORS", "FlowState"]

HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
#: The methods that can move a session's flow on.
FLOW_METHODS = HANDSHAKE_METHODS | {"tools/list", "tools/call"}
#: JSON-RPC codes a server SHOULD NOT count as errors: the caller's mistakes (parse error, invalid
#: request, unknown method, invalid params incl. an unknown tool, resource not found). OpenTelemetry
#: MCP semantic conventions, rpc.response.status_code; the service applies the same rule to spans.
SERVER_NOT_ERRORS = frozenset({-32700, -32600, -32601, -32602, -32002})


class FlowState:
    """Where one session is in initialize -> tools/list -> tools/call."""

    __slots__ = ("call_seen", "handshake_at", "handshake_method", "last_list_at", "list_seen")

    def __init__(self) -> None:
        self.handshake_at: float | None = None
        self.handshake_method: str | None = None
        self.last_list_at: float | None = None
        self.list_seen = False
        self.call_seen = False

    def advance(self, method: str, at: float) -> list[tuple[str, float]]:
        """Note ``method`` arriving at ``at`` (seconds); return the steps it completes, each
        with its length in seconds."""
        steps: list[tuple[str, float]] = []
        if method in HANDSHAKE_METHODS:
            if self.handshake_at is None:
                self.handshake_at = at
                self.handshake_method = method
        elif method == "tools/list":
            if not self.list_seen:
                self.list_seen = True
                if self.handshake_at is not None:
                    steps.append(("initialize->tools/list", at - self.handshake_at))
            if not self.call_seen:
                self.last_list_at = at
        elif method == "tools/call" and not self.call_seen:
            self.call_seen = True
            if self.last_list_at is not None:
                steps.append(("tools/list->tools/call", at - self.last_list_at))
            if self.handshake_at is not None:
                steps.append(("initialize->tools/call", at - self.handshake_at))
        return steps

    def record(
        self, client: Recorder, method: str, at: float, dimensions: Mapping[str, Any]
    ) -> None:
        """`advance`, and record each completed step as a `protocol_latency` event with
        ``dimensions`` (server, client, session, transport) beside its `flow_step`."""
        for step, seconds in self.advance(method, at):
            client.record(
                PROTOCOL_LATENCY,
                duration_ms=seconds * 1000.0,
                dimensions={"flow_step": step, **dimensions},
                metadata={"handshake_method": self.handshake_method}
                if self.handshake_method
                else None,
            )
