"""The application: ``create_app(settings)`` and the lifespan that owns every background task.

>>> from metrics_service import Settings, create_app
>>> app = create_app(Settings(db_path="/tmp/metrics.db"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metrics_service import __version__, auth, compat, route_limits
from metrics_service.analytics.routes import router as analytics_router
from metrics_service.api import (
    INGEST,
    admin,
    error_body,
    install_error_handlers,
    router,
    schema_components,
)
from metrics_service.errors import InvalidPayload
from metrics_service.idempotency import Registry
from metrics_service.ingest import WriteQueue
from metrics_service.otlp import TRACES, Flows
from metrics_service.ratelimit import RateLimiter
from metrics_service.request_ids import SECURITY_HEADERS, RequestIds
from metrics_service.retention import RetentionLoop
from metrics_service.settings import Settings, load_settings
from metrics_service.storage.backend import StorageBackend, create_backend
from metrics_service.telemetry import Telemetry
from metrics_service.validation import Batch, Validator

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AppState:
    settings: Settings
    validator: Validator
    storage: StorageBackend
    queue: WriteQueue
    keys: auth.KeyTable
    limiter: RateLimiter
    authenticator: auth.Authenticator
    retention: RetentionLoop
    telemetry: Telemetry
    idempotency: Registry
    flows: Flows = field(default_factory=Flows)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def on_ingested(self, batch: Batch) -> None:
        if batch.rejections:
            self.telemetry.on_rejections(batch)

    async def readiness(self) -> dict[str, bool]:
        # The backend proves the database writable without writing, on a connection of its own
        # (a probe while another process holds the write lock must not occupy the writer).
        try:
            db_ok = await asyncio.wait_for(self.storage.writable(), 5)
        except Exception:
            db_ok = False
        return {
            "database_writable": db_ok,
            "writer_running": self.queue.running,
            "commits_healthy": self.queue.healthy,
        }

    async def reload_keys(self) -> None:
        # One at a time: a reload that read before a change must not land after one that
        # read after it.
        async with self._reload_lock:
            records = await self.storage.list_keys(active_only=True)
            self.keys.replace(records)

    async def cancel_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _key_reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.key_reload_interval_s)
            try:
                await self.reload_keys()
            except Exception:
                log.exception("reloading keys failed; keeping the previous set")


class RequestIdMiddleware:
    """Pure ASGI: every response carries ``X-Request-Id`` (the caller's if well-formed) and
    conservative security headers; with ``count_statuses`` (the OTLP endpoint's copy), each
    response's status is counted in ``metrics_service_requests_total``. As the one layer every
    route but ``POST /metrics`` passes, it also refuses a query string holding U+0000 (422)."""

    def __init__(self, app: ASGIApp, *, count_statuses: bool = False) -> None:
        self.app = app
        self.count_statuses = count_statuses
        self._ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = self._ids.assign(scope)
        extra = [(b"x-request-id", rid.encode()), *SECURITY_HEADERS]
        if b"%00" in scope.get("query_string", b""):
            # U+0000 in a parameter: no backend can compare or store it alike (PostgreSQL's text
            # cannot hold it), so it is refused before any route sees it.
            error = InvalidPayload(
                "a query parameter holds U+0000 (NUL)",
                details=[
                    {"field": "query", "rule": "charset", "message": "must not contain U+0000"}
                ],
            )
            body = msgspec.json.encode(error_body(error, rid))
            headers = [(b"content-type", b"application/json"), *extra]
            await send({"type": "http.response.start", "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        count = self.count_statuses

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
                if count:
                    state = getattr(scope["app"].state, "metrics", None)
                    if state is not None:
                        state.telemetry.on_request(message["status"])
            await send(message)

        await self.app(scope, receive, send_with_id)


def _build_state(settings: Settings) -> AppState:
    storage = create_backend(settings)
    keys = auth.KeyTable(settings.alias_map())
    limiter = RateLimiter(settings.rate_limit_storage_uri)
    queue = WriteQueue(storage, settings)
    telemetry = Telemetry(settings, queue_depth=lambda: queue.pending_metrics)
    queue.add_listener(telemetry.on_commit)
    queue.on_failure = lambda: telemetry.add("metrics_service_commit_failures")
    authenticator = auth.Authenticator(
        keys,
        limiter,
        settings,
        on_failure=lambda reason: telemetry.add("metrics_service_auth_failures", (reason,)),
    )
    state = AppState(
        settings=settings,
        validator=Validator(settings),
        storage=storage,
        queue=queue,
        keys=keys,
        limiter=limiter,
        authenticator=authenticator,
        retention=RetentionLoop(storage, settings, on_deleted=telemetry.on_retention_deleted),
        telemetry=telemetry,
        idempotency=Registry(settings.idempotency_window_s),
    )
    authenticator.reload = state.reload_keys
    storage.on_keys_changed = authenticator.keys_changed
    return state


class _Deadline:
    """The one shutdown deadline (``METRICS_SHUTDOWN_TIMEOUT_S``), counted from its first use."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._end: float | None = None

    def left(self) -> float:
        if self._end is None:
            self._end = time.monotonic() + self._seconds
        return max(0.0, self._end - time.monotonic())


async def _in_daemon_thread(fn: Callable[[], None], timeout_s: float, what: str) -> None:
    """Run blocking ``fn`` off the event loop; stop waiting after ``timeout_s`` (a daemon thread,
    so a hung exporter cannot hold the process either)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)
        finally:
            # After the deadline the loop may be gone: nobody waits for the answer any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finish)

    threading.Thread(target=run, name=what, daemon=True).start()
    try:
        await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        log.error("%s did not finish within the shutdown deadline", what)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open everything in one exit stack: a failure at any step of the start releases what the
    steps before it opened (ports, threads, connections), and a normal exit closes all of it in
    reverse order within one deadline."""
    settings: Settings = app.state.settings
    deadline = _Deadline(settings.shutdown_timeout_s)
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        state = _build_state(settings)
        app.state.metrics = state
        log.info(
            "metrics-service %s starting: database %s (%s), %s acknowledgement",
            __version__,
            state.storage.description,
            state.storage.name,
            settings.ack_mode.value,
        )
        # Each close is registered before its open: a failed open still ends its threads.
        stack.push_async_callback(state.limiter.close)
        stack.push_async_callback(state.storage.close)
        await state.storage.open()
        if state.storage.applied_migrations:
            log.info("applied schema migrations %s", state.storage.applied_migrations)
        stack.push_async_callback(
            lambda: _in_daemon_thread(
                lambda: state.telemetry.shutdown(deadline.left()),
                deadline.left(),
                "telemetry-shutdown",
            )
        )
        state.telemetry.start()
        counts = await auth.reconcile_env(state.storage, settings)
        log.info(
            "environment keys reconciled: %d kept, %d added, %d revoked, %d left revoked",
            counts["kept"],
            counts["added"],
            counts["revoked"],
            len(counts["refused"]),
        )
        await state.reload_keys()
        if state.keys.count_role("ingest") == 0:
            log.warning(
                "no ingest keys: create one with `metrics-service keys create --service NAME` "
                "or set METRICS_API_KEY_<NAME>"
            )

        async def close_queue() -> None:
            left = await state.queue.close(deadline.left())
            log.info(
                "stopped after %.0f s: %d metrics committed, %d left uncommitted",
                time.monotonic() - started,
                state.queue.committed_metrics,
                left,
            )

        stack.push_async_callback(close_queue)
        state.queue.start()
        stack.push_async_callback(state.retention.shutdown)
        state.retention.start()
        stack.push_async_callback(state.cancel_tasks)
        state.tasks.append(asyncio.create_task(state._key_reload_loop(), name="key-reload"))
        yield
        log.info("shutting down: committing %d pending metrics", state.queue.pending_metrics)


class MetricsApp(FastAPI):
    """FastAPI, with ``POST /metrics`` dispatched before the middleware stack, straight to the
    plain-ASGI ingest endpoint (which adds the request id and security headers itself)."""

    _otlp = RequestIdMiddleware(TRACES, count_statuses=True)
    otlp_paths: frozenset[str] = frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/metrics":
            scope["app"] = self
            await INGEST(scope, receive, send)
        elif (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self.otlp_paths
        ):
            scope["app"] = self
            await self._otlp(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app. Nothing is opened until the lifespan starts."""
    settings = settings or load_settings()
    app = MetricsApp(
        title="MCP metrics service",
        version=__version__,
        description="Collects metric events from MCP services; stores them in SQLite and exports "
        "them through OpenTelemetry.",
        lifespan=lifespan,
        # /docs is served from the package's own Swagger UI files (analytics/routes.py), not a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    # Per-key and per-address limits (slowapi) on the regular routes; the ingest routes have
    # their own (metrics_service/ratelimit.py).
    route_limits.install(app, settings)
    limited = route_limits.dependencies()
    app.include_router(router, dependencies=limited)
    if settings.otlp_ingest_enabled:
        # OTLP/HTTP (docs/otlp.md); like /metrics, dispatched before the middleware stack, and
        # in the route table so that other methods get 405.
        app.otlp_paths = frozenset({"/v1/traces", "/v1/metrics"})
        for path in app.otlp_paths:
            app.add_route(path, TRACES, methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]
    app.include_router(analytics_router, dependencies=limited)
    if settings.admin_enabled:
        assert compat.preview is not None  # its routes are on the admin router
        app.include_router(admin, dependencies=limited)
    schema_components(app)
    app.add_middleware(RequestIdMiddleware)
    return app
