"""mcp 2.x: a `ServerMiddleware` appended to `Server.middleware` / `MCPServer.middleware`.

The middleware sees every inbound message of every transport, both protocol eras: the legacy
`initialize` handshake and the 2026-07-28 per-request envelope opened by `server/discover`.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from typing import Any

from .recording import Instrumentation, McpRequest

__all__ = ["MetricsServerMiddleware"]

_CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"


class MetricsServerMiddleware:
    """`(ctx, call_next)` middleware recording each request through an `Instrumentation`."""

    def __init__(self, instrumentation: Instrumentation) -> None:
        self.instrumentation = instrumentation

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        inst = self.instrumentation
        if ctx.request_id is None or not inst.wants(ctx.method):
            return await call_next(ctx)  # notifications and unobserved methods
        request = _describe(ctx, time.perf_counter())
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            inst.observe(request, error=exc)
            raise
        inst.observe(request, result)
        return result


def _describe(ctx: Any, started: float) -> McpRequest:
    params: Mapping[str, Any] | None = ctx.params
    session = ctx.session
    # The Connection is not public on ServerRequestContext yet (the SDK marks the Context rework
    # as provisional), so reach it defensively: without it only session ids and flows are lost.
    connection = getattr(session, "_connection", None)
    http = ctx.request
    transport_ctx = getattr(getattr(session, "_request_outbound", None), "transport", None)
    kind = getattr(transport_ctx, "kind", None)
    headers: Mapping[str, str] | None = getattr(http, "headers", None)

    session_id = getattr(connection, "session_id", None)
    query = getattr(http, "query_params", None)
    sse_session = query.get("session_id") if query is not None else None
    if session_id is None:
        session_id = sse_session or (headers.get("mcp-session-id") if headers else None)

    if http is None:
        transport = "stdio" if kind in (None, "jsonrpc") else kind
    elif sse_session is not None:
        transport = "sse"
    else:
        transport = "streamable-http"

    client_name, client_version = _client_info(ctx, params)

    key: Hashable | None
    owner: object | None = None
    if session_id is not None:
        key = ("session", session_id)
    elif kind == "streamable-http":
        # The 2026-07-28 HTTP transport has no session: a client's keep-alive connection is the
        # closest thing, so flows are tracked per (peer address, client) when the peer is known.
        peer = getattr(http, "client", None)
        key = ("peer", tuple(peer), client_name, client_version) if peer else None
    else:
        # stdio and SSE: one outbound channel per connection, shared by every request on it.
        owner = getattr(connection, "outbound", None) or connection
        key = ("conn", id(owner)) if owner is not None else None
    return McpRequest(
        method=ctx.method,
        params=params,
        started=started,
        session_key=key,
        session_owner=owner,
        session_id=session_id,
        transport=transport,
        client_name=client_name,
        client_version=client_version,
        headers=headers,
        protocol_version=getattr(ctx, "protocol_version", None),
    )


def _client_info(ctx: Any, params: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    info: Any = None
    if ctx.method == "initialize" and params:
        info = params.get("clientInfo")  # not committed to the session until the chain returns
    if info is None:
        client_params = getattr(ctx.session, "client_params", None)
        info = getattr(client_params, "client_info", None)
    if info is None and params:
        meta = params.get("_meta")
        if isinstance(meta, Mapping):
            info = meta.get(_CLIENT_INFO_META)
    if info is None:
        return None, None
    if isinstance(info, Mapping):
        return info.get("name"), info.get("version")
    return getattr(info, "name", None), getattr(info, "version", None)
