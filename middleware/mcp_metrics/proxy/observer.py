"""What the proxies see on the wire, turned into metric events.

A `Session` pairs JSON-RPC requests with their responses in both directions: the client's
requests (tools/call, tools/list, initialize, ...) and the server's (sampling/createMessage,
elicitation/create, roots/list). Each answered, failed, cancelled or unanswered request becomes
one `tool_execution` event; the session's handshake, first tools/list and first tools/call give
the `protocol_latency` flow steps, as the in-process middleware records them.

Success follows the OpenTelemetry MCP conventions from the server's side (the proxy meters the
server): an error response fails unless its code is one the server rule exempts (-32700, -32600,
-32601, -32602, -32002); a `CallToolResult` with `isError` fails with `error_type` "tool_error".
Only sizes are kept, never payload contents.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Collection, Hashable, Mapping
from typing import Any

from ..events import TOOL_EXECUTION
from ..flow import SERVER_NOT_ERRORS, FlowState
from ..recorder import Recorder
from .frames import decode

__all__ = [
    "CLIENT_TO_SERVER",
    "ERROR_CANCELLED",
    "ERROR_NO_RESPONSE",
    "ERROR_TOOL",
    "SERVER_TO_CLIENT",
    "Observer",
    "Session",
]

logger = logging.getLogger("mcp_metrics")

CLIENT_TO_SERVER = "client_to_server"
SERVER_TO_CLIENT = "server_to_client"

# error_type values beside the JSON-RPC code (as a string). The semconv names "tool_error" and
# the fallback "_OTHER"; it has no value for the two outcomes only a proxy sees, so they are ours.
ERROR_TOOL = "tool_error"
ERROR_CANCELLED = "cancelled"  # the requester sent notifications/cancelled for it
ERROR_NO_RESPONSE = "no_response"  # the session ended (or the stream broke) before an answer

# "SHOULD NOT be considered errors" on the server side (semconv: rpc.response.status_code).
_META_PROTOCOL = "io.modelcontextprotocol/protocolVersion"
_META_CLIENT = "io.modelcontextprotocol/clientInfo"
_AGENT_KEYS = ("agent_id", "agentId", "io.modelcontextprotocol/agentId")
_TENANT_KEYS = ("tenant_id", "tenantId")
_TOKEN_KEYS = {
    "input_tokens": ("input_tokens", "inputTokens"),
    "output_tokens": ("output_tokens", "outputTokens"),
}
MAX_PENDING = 10_000  # outstanding requests per session before the oldest is forgotten
MAX_SESSIONS = 10_000


def _other(direction: str) -> str:
    return SERVER_TO_CLIENT if direction == CLIENT_TO_SERVER else CLIENT_TO_SERVER


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if type(value) is dict else None


def _first(source: Mapping[str, Any] | None, keys: tuple[str, ...]) -> Any:
    if source is None:
        return None
    for key in keys:
        value = source.get(key)
        if value is not None:
            return value
    return None


def _id_key(value: Any) -> Hashable | None:
    # JSON-RPC ids are strings or numbers; 1 and "1" are different requests.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return (type(value) is str, value)


class _Pending:
    __slots__ = ("at", "direction", "meta", "method", "silent", "size", "tool_name")

    def __init__(
        self,
        direction: str,
        method: str,
        tool_name: str | None,
        at: float,
        size: int,
        meta: dict[str, Any] | None,
    ) -> None:
        self.direction = direction
        self.method = method
        self.tool_name = tool_name
        self.at = at
        self.size = size
        self.meta = meta
        self.silent = False  # followed for what its answer says, not recorded (methods=)


class Observer:
    """Shared settings and the sessions of one proxy.

    ```python
    observer = Observer(ThreadedMetricsClient(), server_name=None, transport="stdio")
    session = observer.session()
    session.frame(CLIENT_TO_SERVER, line, len(line) + 1, time.perf_counter())
    ```

    `server_name=None` takes the name the server gives in its initialize result. `methods=None`
    records every request method; otherwise only those named.
    """

    def __init__(
        self,
        client: Recorder,
        *,
        server_name: str | None = None,
        transport: str | None = None,
        methods: Collection[str] | None = None,
    ) -> None:
        self.client = client
        self.server_name = server_name
        self.transport = transport
        self.methods = None if methods is None else frozenset(methods)
        self._sessions: OrderedDict[Hashable, Session] = OrderedDict()

    def session(
        self,
        key: Hashable | None = None,
        *,
        session_id: str | None = None,
        transport: str | None = None,
    ) -> Session:
        """The session for `key` (a new one each call when key is None)."""
        if key is None:
            return Session(self, session_id=session_id, transport=transport)
        found = self._sessions.get(key)
        if found is not None:
            self._sessions.move_to_end(key)
            if session_id and not found.session_id:
                found.session_id = session_id
            return found
        found = Session(self, session_id=session_id, transport=transport)
        self._sessions[key] = found
        if len(self._sessions) > MAX_SESSIONS:
            _, oldest = self._sessions.popitem(last=False)
            oldest.close()
        return found

    def rekey(self, old: Hashable, new: Hashable, *, session_id: str | None = None) -> Session:
        """File the session known as `old` under `new` (the server named the session)."""
        found = self._sessions.pop(old, None)
        if found is None:
            return self.session(new, session_id=session_id)
        if session_id:
            found.session_id = session_id
        self._sessions[new] = found
        return found

    def close_session(self, key: Hashable) -> None:
        found = self._sessions.pop(key, None)
        if found is not None:
            found.close()

    def close(self) -> None:
        while self._sessions:
            _, found = self._sessions.popitem(last=False)
            found.close()


class Session:
    """One MCP session's state: outstanding requests, client identity, the protocol flow."""

    def __init__(
        self, observer: Observer, *, session_id: str | None = None, transport: str | None = None
    ) -> None:
        self.observer = observer
        self.session_id = session_id
        self.transport = transport or observer.transport
        self.server_name = observer.server_name
        self.client_name: str | None = None
        self.client_version: str | None = None
        self.protocol_version: str | None = None
        self._pending: OrderedDict[tuple[str, Hashable], _Pending] = OrderedDict()
        self._flow = FlowState()

    # -- input -------------------------------------------------------------------------------

    def frame(
        self, direction: str, data: bytes | str | None, size: int, at: float
    ) -> list[dict[str, Any]]:
        """One frame as it went by: a message or a batch; its messages. Never raises."""
        messages: list[dict[str, Any]] = []
        try:
            messages = decode(data)
            if len(messages) == 1:
                self._message(direction, messages[0], size, at)
            else:
                for message in messages:  # a batch: each member by the size of its own JSON
                    self._message(direction, message, _json_size(message), at)
        except Exception:
            logger.debug("failed to observe an MCP frame", exc_info=True)
        return messages

    def message(self, direction: str, message: Mapping[str, Any], size: int, at: float) -> None:
        """One decoded JSON-RPC message. Never raises."""
        try:
            self._message(direction, message, size, at)
        except Exception:
            logger.debug("failed to observe an MCP message", exc_info=True)

    def close(self, at: float | None = None) -> None:
        """The session ended: what is still unanswered is recorded as `no_response`."""
        pending, self._pending = self._pending, OrderedDict()
        for entry in pending.values():
            self._record(entry, 0, at, success=False, error_type=ERROR_NO_RESPONSE)

    def fail(self, request_id: Any, error_type: str, at: float) -> bool:
        """End the client's request `request_id` unanswered (its HTTP exchange carried no answer).

        False when it was not outstanding (it was answered, or never seen)."""
        key = _id_key(request_id)
        entry = self._pending.pop((CLIENT_TO_SERVER, key), None) if key is not None else None
        if entry is None:
            return False
        self._record(entry, 0, at, success=False, error_type=error_type)
        return True

    # -- pairing -----------------------------------------------------------------------------

    def _message(self, direction: str, msg: Mapping[str, Any], size: int, at: float) -> None:
        method = msg.get("method")
        if type(method) is str:
            if "id" in msg:
                self._request(direction, method, msg, size, at)
            elif method == "notifications/cancelled":
                params = _mapping(msg.get("params")) or {}
                key = _id_key(params.get("requestId"))
                entry = self._pending.pop((direction, key), None) if key is not None else None
                if entry is not None:
                    self._record(entry, 0, at, success=False, error_type=ERROR_CANCELLED)
            return
        if "result" in msg or "error" in msg:
            self._response(direction, msg, size, at)

    def _request(
        self, direction: str, method: str, msg: Mapping[str, Any], size: int, at: float
    ) -> None:
        params = _mapping(msg.get("params"))
        meta = _mapping(params.get("_meta")) if params else None
        tool_name: str | None = None
        if direction == CLIENT_TO_SERVER:
            if params is not None:
                if method == "initialize":
                    info = _mapping(params.get("clientInfo"))
                    if info is not None:
                        self.client_name = _str(info.get("name"))
                        self.client_version = _str(info.get("version"))
                    self.protocol_version = _str(params.get("protocolVersion"))
                elif method == "tools/call":
                    tool_name = _str(params.get("name"))
                if meta is not None:
                    self._envelope(meta)
            self._flow.record(
                self.observer.client,
                method,
                at,
                {
                    "server_name": self.server_name,
                    "client_name": self.client_name,
                    "session_id": self.session_id,
                    "transport": self.transport,
                },
            )
        wanted = self.observer.methods
        silent = wanted is not None and method not in wanted
        if silent and method != "initialize":
            return
        key = _id_key(msg.get("id"))
        if key is None:
            return
        extra: dict[str, Any] | None = None
        if meta is not None:
            for target, keys in (("agent_id", _AGENT_KEYS), ("tenant_id", _TENANT_KEYS)):
                value = _first(meta, keys)
                if value is not None:
                    extra = extra or {}
                    extra[target] = value
        entry = _Pending(direction, method, tool_name, at, size, extra)
        entry.silent = silent
        self._pending[(direction, key)] = entry
        if len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _envelope(self, meta: Mapping[str, Any]) -> None:
        # The 2026-07-28 protocol has no handshake: every request carries who is calling.
        info = _mapping(meta.get(_META_CLIENT))
        if info is not None:
            self.client_name = _str(info.get("name")) or self.client_name
            self.client_version = _str(info.get("version")) or self.client_version
        version = _str(meta.get(_META_PROTOCOL))
        if version:
            self.protocol_version = version

    def _response(self, direction: str, msg: Mapping[str, Any], size: int, at: float) -> None:
        key = _id_key(msg.get("id"))
        if key is None:
            return
        entry = self._pending.pop((_other(direction), key), None)
        if entry is None:
            return
        error = _mapping(msg.get("error"))
        result = _mapping(msg.get("result"))
        metadata = entry.meta
        if error is not None or "error" in msg:
            code = error.get("code") if error is not None else None
            status = str(code) if isinstance(code, int) and not isinstance(code, bool) else None
            exempt = code in SERVER_NOT_ERRORS and direction == SERVER_TO_CLIENT
            self._record(
                entry,
                size,
                at,
                success=exempt,
                error_type=None if exempt else (status or "_OTHER"),
                status_code=status,
            )
            return
        if result is not None:
            if entry.method == "initialize" and direction == SERVER_TO_CLIENT:
                self.protocol_version = _str(result.get("protocolVersion")) or (
                    self.protocol_version
                )
                info = _mapping(result.get("serverInfo"))
                if self.observer.server_name is None and info is not None:
                    self.server_name = _str(info.get("name")) or self.server_name
            result_meta = _mapping(result.get("_meta"))
            if result_meta is not None:
                for target, keys in _TOKEN_KEYS.items():
                    value = _first(result_meta, keys)
                    if value is not None:
                        metadata = {**(metadata or {}), target: value}
            if result.get("isError") is True:
                self._record(entry, size, at, success=False, error_type=ERROR_TOOL, meta=metadata)
                return
        self._record(entry, size, at, success=True, meta=metadata)

    # -- output ------------------------------------------------------------------------------

    def _record(
        self,
        entry: _Pending,
        output_size: int,
        at: float | None,
        *,
        success: bool,
        error_type: str | None = None,
        status_code: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if entry.silent:
            return
        dims: dict[str, Any] = {
            "method": entry.method,
            "tool_name": entry.tool_name,
            "success": success,
            "server_name": self.server_name,
            "client_name": self.client_name,
            "client_version": self.client_version,
            "input_size_bytes": entry.size,
            "output_size_bytes": output_size,
            "transport": self.transport,
            "session_id": self.session_id,
            "protocol_version": self.protocol_version,
            "error_type": error_type,
            "rpc_status_code": status_code,
            "direction": entry.direction,
        }
        duration_ms = None if at is None else max(at - entry.at, 0.0) * 1000.0
        self.observer.client.record(
            TOOL_EXECUTION,
            duration_ms=duration_ms,
            dimensions=dims,
            metadata=meta if meta is not None else entry.meta,
        )


def _str(value: Any) -> str | None:
    return value if type(value) is str and value else None


def _json_size(message: Mapping[str, Any]) -> int:
    return len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())
