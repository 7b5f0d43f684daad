"""Pure-ASGI middleware that records an `auth_request` event for each request to an auth route.

Works with any ASGI framework (FastAPI, Starlette, ...). Routes are given as templates
(`/oauth/{provider}/callback`) and events are labelled by the template, never by the raw path.
Success defaults to "the status code is 2xx or 3xx"; an endpoint can say otherwise with
`report_auth_outcome(request, success=False, user_id=..., method=...)`, or the middleware can be
given an `outcome=` hook. User ids are hashed before they leave the process.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from .client import MetricsClient
from .events import hash_value
from .recorder import Recorder

__all__ = [
    "AuthMetricsMiddleware",
    "AuthOutcome",
    "AuthRequest",
    "add_auth_metrics_middleware",
    "report_auth_outcome",
]

logger = logging.getLogger("mcp_metrics")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STATE_KEY = "mcp_metrics.auth"
_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::path)?}")


@dataclass(frozen=True)
class AuthOutcome:
    """What an `outcome=` hook returns; None fields fall back to the defaults."""

    success: bool | None = None
    user_id: str | None = None
    method: str | None = None
    server: str | None = None


@dataclass(frozen=True)
class AuthRequest:
    """What the `outcome=`, `user_id=` and `server=` hooks get to look at, once the app answered."""

    scope: Scope
    route: str
    path_params: Mapping[str, str]
    status_code: int
    response_headers: Mapping[str, str]


OutcomeHook = Callable[[AuthRequest], "AuthOutcome | bool | None"]


def report_auth_outcome(
    request: Any,
    *,
    success: bool | None = None,
    user_id: str | None = None,
    method: str | None = None,
    server: str | None = None,
) -> None:
    """Tell the middleware how this request's authentication went, from inside the endpoint.

    `request` is a Starlette/FastAPI `Request` or a raw ASGI scope. `user_id` is hashed by the
    middleware; the raw value is never sent.
    """
    scope = request if isinstance(request, MutableMapping) else request.scope
    state = scope.setdefault("state", {})
    state[_STATE_KEY] = AuthOutcome(success=success, user_id=user_id, method=method, server=server)


def detect_auth_method(scope: Scope) -> str:
    """jwt for a three-part bearer token, oauth for another bearer, else the scheme or noauth."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer":
                return "jwt" if credentials.count(".") == 2 else "oauth"
            return scheme or "noauth"
        if name == b"x-api-key":
            return "api_key"
    return "noauth"


def _compile(template: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in _PARAM.finditer(template):
        pattern += re.escape(template[last : match.start()])
        is_path = match.group(0).endswith(":path}")
        pattern += f"(?P<{match.group(1)}>{'.+' if is_path else '[^/]+'})"
        last = match.end()
    pattern += re.escape(template[last:])
    return re.compile(pattern + "/?$")


class AuthMetricsMiddleware:
    """Record `auth_request` for requests whose path matches one of `auth_routes`.

    ```python
    app = FastAPI()
    app.add_middleware(
        AuthMetricsMiddleware,
        service_name="auth-server",
        auth_routes=["/validate", "/oauth/{provider}/callback"],
    )
    ```

    The middleware starts its client on ASGI lifespan startup and flushes it on shutdown, unless
    the client was passed in (then it belongs to the caller; `owns_client=True` overrides).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: Recorder | None = None,
        service_name: str | None = None,
        auth_routes: Iterable[str] = ("/auth", "/validate", "/token", "/login"),
        server: str | Callable[[AuthRequest], str | None] | None = None,
        auth_method: str | Callable[[Scope], str] | None = None,
        outcome: OutcomeHook | None = None,
        user_id: Callable[[AuthRequest], str | None] | None = None,
        owns_client: bool | None = None,
    ) -> None:
        self.app = app
        self._owns_client = client is None if owns_client is None else owns_client
        self.client: Recorder = client or MetricsClient(service=service_name)
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for template in auth_routes:
            if _PARAM.search(template):
                self._patterns.append((_compile(template), template))
            else:
                stripped = template.rstrip("/") or "/"
                self._exact[stripped] = template
        self._server = server if server is not None else self.client.service
        self._auth_method = auth_method if auth_method is not None else detect_auth_method
        self._outcome = outcome
        self._user_id = user_id

    def _match(self, scope: Scope) -> tuple[str, dict[str, str]] | None:
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        template = self._exact.get(path.rstrip("/") or "/")
        if template is not None:
            return template, {}
        for pattern, template in self._patterns:
            m = pattern.match(path)
            if m:
                return template, m.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            matched = self._match(scope)
            if matched is not None:
                await self._observe(scope, receive, send, *matched)
                return
        elif kind == "lifespan" and self._owns_client:
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _observe(
        self, scope: Scope, receive: Receive, send: Send, route: str, params: dict[str, str]
    ) -> None:
        start = time.perf_counter()
        status = 500
        headers: list[tuple[bytes, bytes]] = []

        async def send_wrapper(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status = 500
            raise
        finally:
            self._record(scope, route, params, status, headers, start)

    def _record(
        self,
        scope: Scope,
        route: str,
        params: dict[str, str],
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        start: float,
    ) -> None:
        try:
            duration_ms = (time.perf_counter() - start) * 1000.0
            reported: AuthOutcome | None = (scope.get("state") or {}).get(_STATE_KEY)
            hook_result: AuthOutcome | bool | None = None
            request: AuthRequest | None = None
            if self._outcome is not None or self._user_id is not None or callable(self._server):
                request = AuthRequest(
                    scope,
                    route,
                    params,
                    status,
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers},
                )
            if self._outcome is not None and request is not None:
                hook_result = self._outcome(request)
            if isinstance(hook_result, bool):
                hook_result = AuthOutcome(success=hook_result)

            success = 200 <= status < 400
            user_id = method = server = None
            for source in (hook_result, reported):  # the endpoint's own report wins
                if source is None:
                    continue
                if source.success is not None:
                    success = source.success
                user_id = source.user_id or user_id
                method = source.method or method
                server = source.server or server
            if user_id is None and self._user_id is not None and request is not None:
                user_id = self._user_id(request)
            if method is None:
                method = (
                    self._auth_method(scope) if callable(self._auth_method) else self._auth_method
                )
            if server is None:
                if callable(self._server):
                    server = self._server(request) if request is not None else None
                else:
                    server = self._server
            self.client.record_auth(
                success=success,
                method=method,
                server=server,
                user_hash=hash_value(user_id) if user_id else None,
                duration_ms=duration_ms,
                route=route,
                status_code=status,
            )
        except Exception:  # never into the host
            logger.debug("failed to record an auth_request metric", exc_info=True)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.client

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and isinstance(client, MetricsClient):
                await client.start()
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await _close(client)
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)


async def _close(client: Recorder) -> None:
    try:
        if isinstance(client, MetricsClient):
            await client.aclose()
        elif hasattr(client, "close"):
            # A ThreadedMetricsClient blocks while it flushes: keep that off the event loop.
            await anyio.to_thread.run_sync(client.close)
    except Exception:
        logger.debug("failed to close the metrics client", exc_info=True)


def add_auth_metrics_middleware(
    app: Any,
    service_name: str | None = None,
    *,
    client: Recorder | None = None,
    **options: Any,
) -> Recorder:
    """Add `AuthMetricsMiddleware` to a Starlette or FastAPI app; returns the metrics client.

    ```python
    from fastapi import FastAPI
    from mcp_metrics import add_auth_metrics_middleware

    app = FastAPI()
    add_auth_metrics_middleware(app, service_name="auth-server", auth_routes=["/validate"])
    ```

    Reads METRICS_SERVICE_URL and METRICS_API_KEY from the environment unless a `client` is
    given. For another ASGI framework wrap the app: `app = AuthMetricsMiddleware(app, ...)`.
    """
    if not hasattr(app, "add_middleware"):
        raise TypeError(
            "add_auth_metrics_middleware needs a Starlette/FastAPI app; "
            "wrap other ASGI apps with AuthMetricsMiddleware(app, ...)"
        )
    owned = client is None
    if client is None:
        client = MetricsClient(service=service_name)
    app.add_middleware(AuthMetricsMiddleware, client=client, owns_client=owned, **options)
    return client
