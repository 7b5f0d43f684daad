"""`mcp-metrics proxy`: a streaming HTTP/1.1 reverse proxy in front of an MCP server.

Each downstream connection gets its own upstream connection (asyncio streams, h11 for the
framing on both sides). Request and response bodies are forwarded chunk by chunk as they arrive;
`text/event-stream` responses stay open and every event is passed on before it is looked at.
The observer sees copies: JSON bodies up to `max_capture_bytes` (a larger one is metered by its
size and the `Mcp-Method` / `Mcp-Name` headers) and each SSE event.

Sessions: the `Mcp-Session-Id` header (streamable HTTP); the endpoint the server announces on
the legacy SSE stream (`event: endpoint`, then POSTs to that URI); otherwise the downstream
keep-alive connection (the sessionless 2026-07-28 transport), as the in-process middleware keys
its flows. Request paths are forwarded unchanged; the upstream URL gives the scheme and address.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from .frames import DEFAULT_MAX_FRAME_BYTES, SseFramer
from .observer import CLIENT_TO_SERVER, ERROR_NO_RESPONSE, SERVER_TO_CLIENT, Observer, Session

__all__ = ["HttpProxy", "Upstream"]

logger = logging.getLogger("mcp_metrics")

READ_SIZE = 65536
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"host"}
)
_SESSION_HEADER = b"mcp-session-id"
_SESSION_PARAMS = ("sessionId", "session_id")
_synthetic_ids = itertools.count(1)
_Key = tuple[str, Any]  # ("sid", id) | ("sse", endpoint) | ("conn", connection)


@dataclass(frozen=True)
class Upstream:
    """Where the MCP server listens: `Upstream.parse("http://127.0.0.1:3001")`."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


class _Closed(Exception):
    """The peer went away."""


class _Side:
    """One h11 connection over one asyncio stream."""

    def __init__(
        self, role: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=64 * 1024)
        self.reader = reader
        self.writer = writer
        self._out: list[bytes] = []

    async def send(self, event: Any) -> None:
        """Queue an event's bytes; they go out on `flush()`, so that what one read brought in
        leaves in one write (a send per event costs a context switch each on loopback)."""
        data = self.conn.send(event)
        if data:
            self._out.append(data)
            if len(self._out) > 64:
                await self.flush()

    async def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self.writer.write(data)
            await self.writer.drain()

    def pending_event(self) -> Any:
        return self.conn.next_event()

    async def next_event(self, flush: _Side | None = None) -> Any:
        """The next event, reading as needed; `flush` goes out before this side waits."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if flush is not None:
                await flush.flush()
            # b"" (the peer closed) makes the next call return ConnectionClosed or raise.
            self.conn.receive_data(await self.reader.read(READ_SIZE))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Capture:
    """A bounded copy of a JSON body."""

    __slots__ = ("limit", "over", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.over = False

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.over:
            return
        if self.size > self.limit:
            self.parts = []
            self.over = True
        else:
            self.parts.append(data)

    def body(self) -> bytes | None:
        return None if self.over else b"".join(self.parts)


class HttpProxy:
    """Relay HTTP between MCP clients and one upstream MCP server, metering what goes by.

    ```python
    proxy = HttpProxy(Upstream.parse("http://127.0.0.1:3001"), observer)
    server = await proxy.start("127.0.0.1", 8080)
    ```
    """

    def __init__(
        self,
        upstream: Upstream,
        observer: Observer,
        *,
        max_capture_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self.observer = observer
        self.max_capture_bytes = max_capture_bytes
        self.connect_timeout_s = connect_timeout_s
        self._ssl = ssl.create_default_context() if upstream.scheme == "https" else None
        self._endpoints: dict[str, _Key] = {}  # legacy SSE: POST target -> session key
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, limit=READ_SIZE * 4)

    async def aclose(self) -> None:
        """End the open connections (SSE streams would otherwise keep them forever)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.observer.close()

    # -- one downstream connection --------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        down = _Side(h11.SERVER, reader, writer)
        peer = writer.get_extra_info("peername")
        conn_key: _Key = ("conn", id(down))
        up: _Side | None = None
        try:
            while True:
                try:
                    event = await down.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(down, exc.error_status_hint, "bad request")
                    break
                if not isinstance(event, h11.Request):
                    break  # ConnectionClosed
                up = await self._exchange(down, up, event, conn_key, peer)
                if down.conn.our_state is not h11.DONE or down.conn.their_state is not h11.DONE:
                    break
                down.conn.start_next_cycle()
        except (_Closed, ConnectionError, h11.ProtocolError, OSError):
            pass
        except Exception:
            logger.exception("mcp-metrics proxy: connection failed")
        finally:
            if up is not None:
                up.close()
            down.close()
            self.observer.close_session(conn_key)
            if task is not None:
                self._tasks.discard(task)

    async def _refuse(self, down: _Side, status: int, message: str) -> None:
        if down.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": message}).encode()
        with contextlib.suppress(Exception):
            await down.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                )
            )
            await down.send(h11.Data(data=body))
            await down.send(h11.EndOfMessage())
            await down.flush()

    async def _connect(self) -> _Side:
        u = self.upstream
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                u.host,
                u.port,
                ssl=self._ssl,
                server_hostname=u.host if self._ssl else None,
                limit=READ_SIZE * 4,
            ),
            self.connect_timeout_s,
        )
        return _Side(h11.CLIENT, reader, writer)

    async def _exchange(
        self,
        down: _Side,
        up: _Side | None,
        request: h11.Request,
        conn_key: _Key,
        peer: Any,
    ) -> _Side | None:
        headers = _request_headers(request, self.upstream, peer)
        if up is not None and (up.conn.our_state is not h11.IDLE or up.reader.at_eof()):
            # Not reusable, or the server closed it while idle (its keep-alive timeout).
            up.close()
            up = None
        if up is None:
            try:
                up = await self._connect()
            except (OSError, asyncio.TimeoutError) as exc:
                await self._drain_body(down)
                await self._refuse(down, 502, f"upstream unreachable: {type(exc).__name__}")
                return None
        target = request.target
        method = request.method
        await up.send(h11.Request(method=method, target=target, headers=headers))
        capture = _Capture(self.max_capture_bytes) if method == b"POST" else None
        while True:
            event = await down.next_event(flush=up)
            if isinstance(event, h11.Data):
                await up.send(event)
                if capture is not None:
                    capture.add(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await up.send(event)
                await up.flush()
                break
            else:
                raise _Closed
        sent_at = time.perf_counter()
        req_headers = {k.lower(): v for k, v in request.headers}
        key, session = self._session_for(req_headers, target, conn_key)
        ids = self._observe_request(session, capture, req_headers, sent_at)
        return await self._relay_response(down, up, request, key, session, ids)

    async def _drain_body(self, down: _Side) -> None:
        while True:
            event = await down.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise _Closed

    # -- the response ---------------------------------------------------------------------

    async def _relay_response(
        self,
        down: _Side,
        up: _Side,
        request: h11.Request,
        key: _Key,
        session: Session,
        ids: list[Any],
    ) -> _Side | None:
        # Watches for the client hanging up while a stream is open (an SSE response can last
        # forever); a plain JSON response is short and is read without it.
        watcher: asyncio.Future[bytes] | None = None
        sse: SseFramer | None = None
        capture: _Capture | None = None
        status = 0
        endpoint_key: _Key | None = None
        try:
            while True:
                event = up.pending_event()
                if event is h11.NEED_DATA:
                    await down.flush()
                    data = await self._read_upstream(up, watcher)
                    if data is None:  # the client hung up: stop streaming to nobody
                        raise _Closed
                    up.conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code != 101:
                        await down.send(event)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    resp_headers = {k.lower(): v for k, v in event.headers}
                    sid = resp_headers.get(_SESSION_HEADER)
                    if sid is not None and key != ("sid", sid):
                        new_key: _Key = ("sid", sid)
                        session = self.observer.rekey(key, new_key, session_id=sid.decode())
                        key = new_key
                    kind = resp_headers.get(b"content-type", b"").split(b";")[0].strip()
                    if kind == b"text/event-stream":
                        sse = SseFramer(self.max_capture_bytes)
                        watcher = asyncio.ensure_future(down.reader.read(READ_SIZE))
                    elif kind == b"application/json":
                        capture = _Capture(self.max_capture_bytes)
                    await down.send(
                        h11.Response(
                            status_code=status,
                            headers=_response_headers(event.headers),
                            reason=event.reason,
                        )
                    )
                    continue
                if isinstance(event, h11.Data):
                    await down.send(event)
                    if sse is not None:
                        for sse_event in sse.feed(event.data):
                            endpoint_key, session = self._sse_event(
                                sse_event, session, endpoint_key, request
                            )
                    elif capture is not None:
                        capture.add(event.data)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    await down.send(event)
                    await down.flush()
                    break
                raise _Closed  # ConnectionClosed before the end of the response
        except _Closed:
            up.close()
            raise
        finally:
            now = time.perf_counter()
            if capture is not None and not capture.over:
                session.frame(SERVER_TO_CLIENT, capture.body(), capture.size, now)
            self._settle(session, ids, status, now, legacy=key[0] == "sse")
            if endpoint_key is not None:  # the legacy SSE stream is the session
                self._endpoints = {t: k for t, k in self._endpoints.items() if k != endpoint_key}
                self.observer.close_session(endpoint_key)
            if request.method == b"DELETE" and key[0] == "sid" and 200 <= status < 300:
                self.observer.close_session(key)
            if watcher is not None and not watcher.done():
                watcher.cancel()
                # Let the cancellation land: the stream allows one reader at a time.
                await asyncio.gather(watcher, return_exceptions=True)
        leftover = b""
        if (
            watcher is not None
            and watcher.done()
            and not watcher.cancelled()
            and watcher.exception() is None
        ):
            leftover = watcher.result()
        if leftover:
            down.conn.receive_data(leftover)  # the next pipelined request, read early
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
            return up
        up.close()
        return None

    async def _read_upstream(
        self, up: _Side, watcher: asyncio.Future[bytes] | None
    ) -> bytes | None:
        """The next upstream bytes, or None when the downstream client disconnected first."""
        if watcher is None:
            return await up.reader.read(READ_SIZE)
        read = asyncio.ensure_future(up.reader.read(READ_SIZE))
        while True:
            waiting: set[asyncio.Future[bytes]] = {read}
            if not watcher.done():
                waiting.add(watcher)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                return read.result()
            if watcher.result() == b"":
                read.cancel()
                return None
            # The client sent its next request early; it is kept in `watcher` for later.

    def _sse_event(
        self, event: Any, session: Session, endpoint_key: _Key | None, request: h11.Request
    ) -> tuple[_Key | None, Session]:
        now = time.perf_counter()
        if event.event == "endpoint" and event.data and request.method == b"GET":
            parts = urlsplit(event.data)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            query = parse_qs(parts.query)
            sid = next((query[p][0] for p in _SESSION_PARAMS if p in query), None)
            endpoint_key = ("sse", target)
            self._endpoints[target] = endpoint_key
            session = self.observer.session(endpoint_key, session_id=sid or target, transport="sse")
            return endpoint_key, session
        if event.event == "message" and event.data is not None:
            session.frame(SERVER_TO_CLIENT, event.data, event.size, now)
        return endpoint_key, session

    def _settle(
        self, session: Session, ids: list[Any], status: int, at: float, *, legacy: bool
    ) -> None:
        # A streamable-HTTP POST answers its requests in its own response; once that is over,
        # what it left unanswered never will be. Legacy SSE answers on the GET stream instead,
        # unless the POST itself was refused.
        if legacy and 200 <= status < 300:
            return
        error = ERROR_NO_RESPONSE if 200 <= status < 300 or status == 0 else str(status)
        for request_id in ids:
            session.fail(request_id, error, at)

    # -- the request ----------------------------------------------------------------------

    def _session_for(
        self, headers: dict[bytes, bytes], target: bytes, conn_key: _Key
    ) -> tuple[_Key, Session]:
        sid = headers.get(_SESSION_HEADER)
        if sid is not None:
            key: _Key = ("sid", sid)
            return key, self.observer.session(key, session_id=sid.decode("latin-1"))
        legacy = self._endpoints.get(target.decode("latin-1"))
        if legacy is not None:
            return legacy, self.observer.session(legacy, transport="sse")
        return conn_key, self.observer.session(conn_key)

    def _observe_request(
        self,
        session: Session,
        capture: _Capture | None,
        headers: dict[bytes, bytes],
        at: float,
    ) -> list[Any]:
        """Feed the POSTed messages to the session; the ids of the requests among them."""
        if capture is None:
            return []
        if capture.over:
            method = headers.get(b"mcp-method")
            if method is None:
                return []
            # Too large to look into: meter it by its headers and its size.
            synthetic = f"mcp-metrics-proxy-{next(_synthetic_ids)}"
            params: dict[str, Any] = {}
            name = headers.get(b"mcp-name")
            if name is not None:
                params["name"] = name.decode("utf-8", "replace")
            message = {"id": synthetic, "method": method.decode("utf-8", "replace")}
            session.message(CLIENT_TO_SERVER, {**message, "params": params}, capture.size, at)
            return [synthetic]
        messages = session.frame(CLIENT_TO_SERVER, capture.body(), capture.size, at)
        return [m["id"] for m in messages if "method" in m and "id" in m]


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _request_headers(
    request: h11.Request, upstream: Upstream, peer: Any
) -> list[tuple[bytes, bytes]]:
    drop = _HOP_BY_HOP | _connection_tokens(request.headers)
    out = [(b"host", upstream.authority)]
    original_host = b""
    forwarded_for = b""
    for name, value in request.headers:
        lowered = name.lower()
        if lowered == b"host":
            original_host = value
        if lowered == b"x-forwarded-for":
            forwarded_for = value + b", "
            continue
        if lowered not in drop:
            out.append((name, value))
    if isinstance(peer, tuple) and peer:
        out.append((b"x-forwarded-for", forwarded_for + str(peer[0]).encode()))
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    return out


def _response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]
