"""mcp 1.x: wrap the low-level server's request handlers, and watch the handshake on the streams.

mcp 1.x has no server middleware and answers `initialize` inside `ServerSession`, where no request
handler runs. So `Server.run` (which every transport calls once per session) is wrapped: it hands
the session read/write streams that notice the `initialize` request and its response, and sets a
context variable naming the session, which the wrapped handlers (tasks started inside `run`)
inherit. Works for `FastMCP` and for the low-level `Server`, whenever handlers are registered.
"""

from __future__ import annotations

import contextvars
import importlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .recording import Instrumentation, McpRequest

__all__ = ["install"]

Handler = Callable[[Any], Awaitable[Any]]

_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "mcp_metrics_v1_session", default=None
)


class JsonRpcErrorResponse(Exception):
    """Stands for a JSON-RPC error response when recording it as a failure."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Session:
    """One `Server.run` call: one client session, whatever the transport."""

    __slots__ = ("__weakref__", "pending")

    def __init__(self) -> None:
        self.pending: dict[Any, McpRequest] = {}


def _transport_of(http: Any) -> tuple[str, str | None]:
    """(transport, session id) from the Starlette request a message came with, if any."""
    if http is None:
        return "stdio", None
    sse_session = http.query_params.get("session_id")
    if sse_session is not None:
        return "sse", sse_session
    return "streamable-http", http.headers.get("mcp-session-id")


class _StreamProxy:
    """Delegates to one of the session's streams; subclasses look at what passes."""

    def __init__(self, inner: Any, session: _Session, inst: Instrumentation) -> None:
        self._inner = inner
        self._session = session
        self._inst = inst

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> Any:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._inner.__aexit__(*exc)


class _ReadStream(_StreamProxy):
    """The session's read stream; notes when `initialize` arrives."""

    def __aiter__(self) -> _ReadStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._inner.__anext__()
        self._note(item)
        return item

    async def receive(self) -> Any:
        item = await self._inner.receive()
        self._note(item)
        return item

    def _note(self, item: Any) -> None:
        try:
            root: Any = getattr(getattr(item, "message", None), "root", None)
            if getattr(root, "method", None) != "initialize" or not self._inst.wants("initialize"):
                return
            params = root.params or {}
            info = params.get("clientInfo") or {}
            http = getattr(getattr(item, "metadata", None), "request_context", None)
            transport, session_id = _transport_of(http)
            self._session.pending[root.id] = McpRequest(
                method="initialize",
                params=params,
                started=time.perf_counter(),
                session_key=("v1", id(self._session)),
                session_owner=self._session,
                session_id=session_id,
                transport=transport,
                client_name=info.get("name"),
                client_version=info.get("version"),
                headers=getattr(http, "headers", None),
            )
        except Exception:
            pass


class _WriteStream(_StreamProxy):
    """The session's write stream; records the `initialize` response."""

    async def send(self, item: Any) -> None:
        if self._session.pending:
            root = getattr(getattr(item, "message", None), "root", None)
            request = self._session.pending.pop(getattr(root, "id", None), None)
            if request is not None:
                error = getattr(root, "error", None)
                if error is not None:
                    self._inst.observe(
                        request,
                        error=JsonRpcErrorResponse(
                            str(error.message), getattr(error, "code", None)
                        ),
                    )
                else:
                    result = getattr(root, "result", None)
                    if isinstance(result, Mapping) and request.protocol_version is None:
                        negotiated = result.get("protocolVersion")
                        request.protocol_version = (
                            negotiated if isinstance(negotiated, str) else None
                        )
                    self._inst.observe(request, result)
        await self._inner.send(item)


class _Handlers(dict):  # type: ignore[type-arg]
    """`Server.request_handlers` that wraps each handler as it is registered."""

    def __init__(self, base: Mapping[Any, Handler], inst: Instrumentation) -> None:
        super().__init__()
        self._inst = inst
        self.update(base)

    def __setitem__(self, key: Any, handler: Handler) -> None:
        super().__setitem__(key, _wrap(handler, self._inst))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]


def _wrap(handler: Handler, inst: Instrumentation) -> Handler:
    if getattr(handler, "__mcp_metrics__", False):
        return handler

    async def wrapped(req: Any) -> Any:
        method = getattr(req, "method", None)
        if not isinstance(method, str) or not inst.wants(method):
            return await handler(req)
        request = _describe(req, method, time.perf_counter())
        try:
            result = await handler(req)
        except BaseException as exc:
            inst.observe(request, error=exc)
            raise
        inst.observe(request, getattr(result, "root", result))  # unwrap ServerResult
        return result

    wrapped.__mcp_metrics__ = True  # type: ignore[attr-defined]
    wrapped.__wrapped__ = handler  # type: ignore[attr-defined]
    return wrapped


def _describe(req: Any, method: str, started: float) -> McpRequest:
    # mcp 1.x only: the context variable its request handlers read their context from.
    request_ctx = importlib.import_module("mcp.server.lowlevel.server").request_ctx
    params_model = getattr(req, "params", None)
    params = (
        params_model.model_dump(by_alias=True, exclude_none=True, mode="json")
        if params_model is not None
        else None
    )
    ctx = request_ctx.get(None)
    http = getattr(ctx, "request", None)
    transport, session_id = _transport_of(http)
    client_params = getattr(getattr(ctx, "session", None), "client_params", None)
    info = getattr(client_params, "clientInfo", None)
    session = _session.get()
    return McpRequest(
        method=method,
        params=params,
        started=started,
        session_key=("v1", id(session)) if session is not None else None,
        session_owner=session,
        session_id=session_id,
        transport=transport,
        client_name=getattr(info, "name", None),
        client_version=getattr(info, "version", None),
        headers=getattr(http, "headers", None),
        protocol_version=getattr(client_params, "protocolVersion", None),
    )


def install(
    server: Any, inst: Instrumentation, on_session_end: Callable[[], Awaitable[None]]
) -> None:
    lowlevel = getattr(server, "_mcp_server", server)  # FastMCP keeps the low-level Server here
    if getattr(lowlevel, "__mcp_metrics__", False):
        raise RuntimeError("this MCP server is already instrumented")
    lowlevel.request_handlers = _Handlers(lowlevel.request_handlers, inst)
    original_run = lowlevel.run

    async def run(read_stream: Any, write_stream: Any, *args: Any, **kwargs: Any) -> Any:
        session = _Session()
        token = _session.set(session)
        try:
            return await original_run(
                _ReadStream(read_stream, session, inst),
                _WriteStream(write_stream, session, inst),
                *args,
                **kwargs,
            )
        finally:
            _session.reset(token)
            await on_session_end()

    lowlevel.run = run
    lowlevel.__mcp_metrics__ = True
