"""SDK-independent half of the MCP instrumentation: what one request turns into.

Each observed request becomes a `tool_execution` event; the session's first tools/list and first
tools/call also produce the `protocol_latency` flow steps, once per session.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from ..events import TOOL_EXECUTION
from ..flow import FLOW_METHODS, HANDSHAKE_METHODS, FlowState
from ..flow import SERVER_NOT_ERRORS as _SERVER_NOT_ERROR_CODES
from ..recorder import Recorder
from ..tools import is_error_result, payload_size

__all__ = [
    "DEFAULT_METHODS",
    "HANDSHAKE_METHODS",
    "SERVER_NOT_ERRORS",
    "Instrumentation",
    "McpRequest",
    "error_type_of",
]

logger = logging.getLogger("mcp_metrics")

DEFAULT_METHODS = frozenset({"initialize", "server/discover", "tools/list", "tools/call"})
MAX_SESSIONS = 10_000
#: `flow.SERVER_NOT_ERRORS` as the strings the SDKs' errors carry.
SERVER_NOT_ERRORS = frozenset(str(code) for code in _SERVER_NOT_ERROR_CODES)
_INVALID_PARAMS = "-32602"

_AGENT_KEYS = ("agent_id", "agentId", "io.modelcontextprotocol/agentId")
_TENANT_KEYS = ("tenant_id", "tenantId")
_TOKEN_KEYS = {
    "input_tokens": ("input_tokens", "inputTokens"),
    "output_tokens": ("output_tokens", "outputTokens"),
}


@dataclass
class McpRequest:
    """One inbound request as the SDK adapters see it."""

    method: str
    params: Mapping[str, Any] | None
    started: float  # time.perf_counter() at arrival
    session_key: Hashable | None = None
    session_owner: object | None = None  # weakly checked, so a reused id() is a new session
    session_id: str | None = None
    transport: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    headers: Mapping[str, str] | None = None
    protocol_version: str | None = None


MetadataHook = Callable[[McpRequest, Any], "Mapping[str, Any] | None"]


class _Flow(FlowState):
    """A session's flow, with the object that owns the session (weakly: a reused id() is a new
    session)."""

    __slots__ = ("owner",)

    def __init__(self, owner: object | None) -> None:
        super().__init__()
        self.owner: weakref.ref[object] | None = None
        if owner is not None:
            try:
                self.owner = weakref.ref(owner)
            except TypeError:
                self.owner = None


class Instrumentation:
    """Turns observed MCP requests into metrics; shared by the mcp 1.x and 2.x adapters."""

    def __init__(
        self,
        client: Recorder,
        *,
        server_name: str | None,
        transport: str | None = None,
        methods: Collection[str] | None = DEFAULT_METHODS,
        measure_sizes: bool = True,
        metadata: MetadataHook | None = None,
    ) -> None:
        self.client = client
        self.server_name = server_name
        self.transport = transport
        self.methods = None if methods is None else frozenset(methods)
        self.measure_sizes = measure_sizes
        self.metadata_hook = metadata
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()

    def wants(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def observe(
        self, request: McpRequest, result: Any = None, error: BaseException | None = None
    ) -> None:
        """Record one finished request. Never raises."""
        try:
            self._observe(request, result, error)
        except Exception:
            logger.debug("failed to record an MCP metric", exc_info=True)

    def _observe(self, request: McpRequest, result: Any, error: BaseException | None) -> None:
        duration_ms = (time.perf_counter() - request.started) * 1000.0
        method = request.method
        params = request.params or {}
        error_type = error_type_of(method, result, error)
        success = error_type is None or error_type in SERVER_NOT_ERRORS
        version = request.protocol_version
        if version is None and method == "initialize":
            version = params.get("protocolVersion")
        dims: dict[str, Any] = {
            "method": method,
            "tool_name": params.get("name") if method == "tools/call" else None,
            "success": success,
            "server_name": self.server_name,
            "client_name": request.client_name,
            "client_version": request.client_version,
            "transport": self.transport or request.transport,
            "session_id": request.session_id,
            "protocol_version": version if isinstance(version, str) else None,
            "error_type": error_type,
        }
        if self.measure_sizes:
            if method == "tools/call":
                dims["input_size_bytes"] = payload_size(params.get("arguments") or {})
            else:
                dims["input_size_bytes"] = payload_size(
                    {k: v for k, v in params.items() if k != "_meta"} if params else None
                )
            dims["output_size_bytes"] = payload_size(result) if error is None else 0
        metadata = self._metadata(request, result, error)
        self.client.record(
            TOOL_EXECUTION, duration_ms=duration_ms, dimensions=dims, metadata=metadata
        )
        self._flow_steps(request, dims)

    def _metadata(
        self, request: McpRequest, result: Any, error: BaseException | None
    ) -> dict[str, Any] | None:
        meta: dict[str, Any] = {}
        params_meta = (request.params or {}).get("_meta")
        headers = request.headers or {}
        for target, keys, header in (
            ("agent_id", _AGENT_KEYS, "x-agent-id"),
            ("tenant_id", _TENANT_KEYS, "x-tenant-id"),
        ):
            value = _first(params_meta, keys) or headers.get(header)
            if value is not None:
                meta[target] = value
        result_meta = _result_meta(result)
        for target, keys in _TOKEN_KEYS.items():
            value = _first(result_meta, keys)
            if value is None:
                value = _first(params_meta, keys)
            if value is not None:
                meta[target] = value
        if error is not None:
            meta["error"] = type(error).__name__
        ids = _current_span_ids()
        if ids is not None:
            meta["trace_id"], meta["span_id"] = ids
        if self.metadata_hook is not None:
            extra = self.metadata_hook(request, result)
            if extra:
                meta.update(extra)
        return meta or None

    def _flow_steps(self, request: McpRequest, dims: Mapping[str, Any]) -> None:
        if request.session_key is None or request.method not in FLOW_METHODS:
            return
        self._flow(request).record(
            self.client,
            request.method,
            request.started,
            {
                "server_name": self.server_name,
                "client_name": dims.get("client_name"),
                "session_id": dims.get("session_id"),
                "transport": dims.get("transport"),
            },
        )

    def _flow(self, request: McpRequest) -> _Flow:
        key = request.session_key
        flow = self._flows.get(key)
        if (
            flow is not None
            and flow.owner is not None
            and flow.owner() is not request.session_owner
        ):
            flow = None  # the object that keyed this session is gone: a new session reused its id
        if flow is None:
            flow = _Flow(request.session_owner)
            self._flows[key] = flow
            if len(self._flows) > MAX_SESSIONS:
                self._flows.popitem(last=False)
        else:
            self._flows.move_to_end(key)
        return flow


def error_type_of(method: str, result: Any, error: BaseException | None) -> str | None:
    """The semconv ``error.type``: the JSON-RPC error code as a string, ``tool_error`` for a
    CallToolResult with isError, else the exception's class name; None when nothing failed."""
    if error is not None:
        code = getattr(getattr(error, "error", None), "code", None)  # McpError / MCPError
        if code is None:
            code = getattr(error, "code", None)
        if isinstance(code, int) and not isinstance(code, bool):
            return str(code)
        cls = type(error)
        if cls.__name__ == "ValidationError" and cls.__module__.startswith("pydantic"):
            return _INVALID_PARAMS  # what the SDKs answer for parameters that do not validate
        return cls.__qualname__
    if method == "tools/call" and is_error_result(result):
        return "tool_error"
    return None


def _current_span_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span active in the host, when the host uses
    OpenTelemetry (already imported: this never imports it, so there is no dependency)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        context = trace.get_current_span().get_span_context()
    except Exception:
        return None
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _first(source: Any, keys: tuple[str, ...]) -> Any:
    if source is None or not (type(source) is dict or isinstance(source, Mapping)):
        return None
    for key in keys:
        value = source.get(key)
        if value is not None:
            return value
    return None


def _result_meta(result: Any) -> Any:
    if type(result) is dict or isinstance(result, Mapping):
        return result.get("_meta")
    root = getattr(result, "root", result)  # mcp 1.x wraps results in ServerResult
    return getattr(root, "meta", None)
