"""HTTP routes. The ingest path (``IngestEndpoint``) reads top to bottom:
auth -> rate limit -> content type and size -> validation -> write queue (commit) -> response.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from metrics_service import auth, idempotency
from metrics_service.errors import (
    ApiError,
    Forbidden,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    StorageError,
    Unavailable,
    UnsupportedMediaType,
)
from metrics_service.models import (
    ErrorResponse,
    IngestResult,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    MetricsPayload,
    PolicyInfo,
    PolicyUpdate,
    RateLimitStatus,
)
from metrics_service.request_ids import SECURITY_HEADERS, RequestIds
from metrics_service.retention import run_once
from metrics_service.settings import AckMode, Settings
from metrics_service.storage.schema import TABLES

if TYPE_CHECKING:
    from metrics_service.app import AppState
    from metrics_service.validation import Batch

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "The body is not valid JSON.",
        401: "Missing, unknown or revoked API key.",
        403: "The key may not do this (wrong role, or another service).",
        413: "The body is larger than METRICS_MAX_REQUEST_BYTES.",
        408: "The body did not arrive within METRICS_REQUEST_TIMEOUT_S.",
        415: "Content-Type is not application/json.",
        429: "Over the rate limit (or too many failed authentications); see Retry-After.",
        503: "Shutting down, or the write queue is full or failing; see Retry-After.",
    }.items()
}


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _encode(content), status_code=status, headers=headers, media_type="application/json"
    )


def request_id(request: Request) -> str:
    return str(request.scope.get("request_id", ""))


def error_body(error: ApiError, rid: str) -> dict[str, Any]:
    # ``detail``: the message where FastAPI (and the MCP Gateway Registry's metrics-service)
    # put it, for clients that read only that.
    return {
        "error": {"code": error.code, "message": error.message, "details": error.details},
        "detail": error.message,
        "request_id": rid,
    }


def error_response(request: Request, error: ApiError) -> Response:
    return json_response(error_body(error, request_id(request)), error.status, error.headers)


def _scrape_hint(settings: Settings) -> str:
    """The 405 for ``GET /metrics`` on the API port (the usual Prometheus habit): where to look."""
    hint = "/metrics on this port takes POST (metric ingest); "
    if not settings.otel_prometheus_enabled:
        return hint + "the Prometheus endpoint is off (OTEL_PROMETHEUS_ENABLED=false)"
    host, port = settings.otel_prometheus_host, settings.otel_prometheus_port
    return hint + f"Prometheus scrapes http://{host}:{port}/metrics (OTEL_PROMETHEUS_PORT)"


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(request, exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "rule": err.get("type", "invalid"),
                "message": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        return error_response(request, InvalidPayload("the request is invalid", details=details))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 405 and request.url.path == "/metrics":
            message = _scrape_hint(request.app.state.settings)
        error = ApiError(message, headers=dict(exc.headers or {}))
        error.status = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, error)

    async def database_error(request: Request, exc: Exception) -> Response:
        # Locked by another process, disk full, I/O error: the database refused, retry later.
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            request,
            Unavailable("the database is unavailable, retry later", headers={"Retry-After": "1"}),
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, ApiError("internal error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StorageError, database_error)
    app.add_exception_handler(Exception, unexpected)


def state(request: Request) -> AppState:
    return request.app.state.metrics  # type: ignore[no-any-return]


def client_address(request: Request) -> str:
    """The client's address (``X-Forwarded-For`` only from ``METRICS_TRUSTED_PROXIES``)."""
    return state(request).authenticator.client_address(
        request.client.host if request.client else None,
        request.headers.getlist("x-forwarded-for"),
    )


def _presented_key(
    x_api_key: Annotated[
        str | None, Header(alias="X-API-Key", description="The caller's API key.")
    ] = None,
    authorization: Annotated[
        str | None,
        Header(description="`Bearer <key>`: the same key, in the form OTLP exporters send."),
    ] = None,
) -> str | None:
    return auth.presented_key(x_api_key, authorization)


APIKey = Annotated[str | None, Depends(_presented_key)]


async def admin_principal(request: Request, x_api_key: APIKey = None) -> auth.Principal:
    return await state(request).authenticator.authenticate(
        x_api_key, client_address(request), "admin"
    )


Admin = Annotated[auth.Principal, Depends(admin_principal)]
router = APIRouter()
admin = APIRouter(
    prefix="/admin",
    tags=["admin"],
    # The real error model for 422 too (FastAPI would declare its own, which we never send).
    responses={
        **_ERRORS,
        404: {"model": ErrorResponse, "description": "No such table or key id."},
        422: {
            "model": ErrorResponse,
            "description": "A parameter or the body is invalid (field and rule in details).",
        },
    },
)


def wrong_service_message(principal: auth.Principal, service: str) -> str:
    """The 403 text: whose key it is and the two ways to let it report as ``service``."""
    names = ", ".join(repr(n) for n in sorted(principal.services))
    return (
        f"this key was issued for service {principal.service!r} (it may report as {names}),"
        f" not {service!r}; to allow {service!r} for it, set"
        f" METRICS_SERVICE_ALIASES={principal.service}:{service}"
        f" or create a key with `metrics-service keys create --service {principal.service}"
        f' --alias {service}` (or "aliases": ["{service}"] in POST /admin/keys)'
    )


class ClientGone(Exception):
    """The client disconnected before its request body arrived; there is no one to answer."""


class _BodyDeadlines:
    """The body deadlines of one event loop, enforced by one timer for all the reads.

    ``asyncio.timeout`` per request cost about 5 us at batch 1 (a timer scheduled and cancelled,
    a context object per read; bench/breakdown.py); here a read notes its task and deadline in a
    dict and one timer, armed at the nearest deadline, cancels the reads past theirs (and under
    load fires about once per ``METRICS_REQUEST_TIMEOUT_S``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[asyncio.Task[Any], float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self.expired: set[asyncio.Task[Any]] = set()

    def enter(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        due = self._loop.time() + timeout_s
        self._due[task] = due
        if self._timer is None or due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_due = self._loop.call_at(due, self._check), due

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self.expired.discard(task)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        nearest: float | None = None
        for task, due in list(self._due.items()):
            if due <= now:
                del self._due[task]
                self.expired.add(task)
                task.cancel()
            elif nearest is None or due < nearest:
                nearest = due
        if nearest is not None:
            self._timer, self._timer_due = self._loop.call_at(nearest, self._check), nearest


_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BodyDeadlines] = (
    weakref.WeakKeyDictionary()
)
#: The last loop's deadlines (a loop's own, looked up again only when the loop changes).
_current: tuple[weakref.ref[asyncio.AbstractEventLoop], _BodyDeadlines] | None = None


def _deadlines() -> _BodyDeadlines:
    global _current
    loop = asyncio.get_running_loop()
    current = _current
    if current is not None and current[0]() is loop:
        return current[1]
    deadlines = _DEADLINES.get(loop)
    if deadlines is None:
        deadlines = _DEADLINES[loop] = _BodyDeadlines(loop)
    _current = (weakref.ref(loop), deadlines)
    return deadlines


async def read_body(
    receive: Receive, declared: bytes | None, limit: int, timeout_s: float
) -> bytes:
    """The body, refusing (413) as soon as it exceeds ``limit`` bytes (never buffering more) and
    (408) if it has not arrived within ``timeout_s``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks = []
    size = 0
    task = asyncio.current_task()
    assert task is not None
    deadlines = _deadlines()
    cancelling = task.cancelling()
    deadlines.enter(task, timeout_s)
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        # Ours (the deadline passed) unless someone else cancelled the task too, as
        # ``asyncio.timeout`` tells them apart.
        if task in deadlines.expired and task.uncancel() <= cancelling:
            raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
        raise
    finally:
        deadlines.leave(task)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass(slots=True)
class IngestHeaders:
    """What the ingest paths read from the request headers, in one pass over the raw ASGI list
    (the first of each header counts; ``X-Forwarded-For`` is read only from trusted proxies)."""

    api_key: str | None = None
    client: str = "unknown"
    content_type: bytes | None = None
    encoding: bytes | None = None  # stripped, lower case
    length: bytes | None = None
    idempotency_key: bytes | None = None


async def admit(
    app: AppState, scope: Scope
) -> tuple[auth.Principal, IngestHeaders, dict[str, str]]:
    """Authenticate an ingest request (``X-API-Key`` or ``Authorization: Bearer``) and take one
    hit of its key's rate limit: the principal, the headers the caller reads next, and the
    rate-limit headers of the answer."""
    headers = IngestHeaders()
    api_key = authorization = None
    forwarded: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            api_key = api_key or value
        elif name == b"authorization":
            authorization = authorization or value
        elif name == b"x-forwarded-for":
            forwarded.append(value.decode("latin-1"))
        elif name == b"content-type":
            headers.content_type = headers.content_type or value
        elif name == b"content-encoding":
            headers.encoding = headers.encoding or value.strip().lower()
        elif name == b"content-length":
            headers.length = headers.length or value
        elif name == b"idempotency-key":
            headers.idempotency_key = headers.idempotency_key or value
    peer = scope.get("client")
    headers.api_key = auth.presented_key(api_key, authorization)
    headers.client = app.authenticator.client_address(peer[0] if peer else None, forwarded)
    principal = await app.authenticator.authenticate(headers.api_key, headers.client, "ingest")
    decision = await app.limiter.hit(
        "key",
        str(principal.key_id),
        principal.rate_limit_per_min or app.settings.rate_limit_per_min,
    )
    if not decision.allowed:
        app.telemetry.add("metrics_service_rate_limited_requests")
        raise RateLimited("rate limit exceeded for this key", headers=decision.headers())
    return principal, headers, decision.headers()


class IngestEndpoint:
    """``POST /metrics`` as a plain ASGI app: the ingest path reads top to bottom, with no
    framework layer on it (FastAPI's routing, dependency solving and middleware cost more per
    request than everything below; see the README's performance section).

    The app dispatches to it before its middleware stack; the route table holds it too, so that
    other methods on ``/metrics`` get 405. Errors take the same shape as everywhere else.
    """

    def __init__(self) -> None:
        self._ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Called straight from the app (MetricsApp), it sets the request id and the security
        # headers and counts the status itself; through the middleware stack, that layer has.
        own_headers = "request_id" not in scope
        rid = self._ids.assign(scope) if own_headers else str(scope["request_id"])
        try:
            status, content, headers = await self.ingest(
                scope["app"].state.metrics, scope, receive, rid
            )
        except ApiError as error:
            status, content, headers = error.status, error_body(error, rid), error.headers
        except ClientGone:
            return
        except Exception:
            log.exception("unhandled error on POST /metrics")
            internal = ApiError("internal error")
            status, content, headers = internal.status, error_body(internal, rid), {}
        body = _encode(content)
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in headers.items()
            ),
        ]
        if own_headers:
            raw_headers += [(b"x-request-id", rid.encode()), *SECURITY_HEADERS]
            state = getattr(scope["app"].state, "metrics", None)
            if state is not None:
                state.telemetry.on_request(status)
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def ingest(
        app: AppState, scope: Scope, receive: Receive, rid: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Store the valid metrics of the batch; report each rejected one by index, field and
        rule."""
        principal, request, headers = await admit(app, scope)
        content_type, encoding = request.content_type, request.encoding
        if (
            content_type is None
            or content_type.split(b";", 1)[0].strip().lower() != b"application/json"
        ):
            raise UnsupportedMediaType("Content-Type must be application/json")
        if encoding not in (None, b"", b"identity"):
            raise UnsupportedMediaType(
                "Content-Encoding is not supported; send the body uncompressed"
            )
        key = (
            None
            if request.idempotency_key is None
            else idempotency.parse_key(request.idempotency_key)
        )
        body = await read_body(
            receive, request.length, app.settings.max_request_bytes, app.settings.request_timeout_s
        )
        batch = app.validator.decode(body)
        if batch.service not in principal.services:
            app.telemetry.add("metrics_service_auth_failures", ("wrong_service",))
            raise Forbidden(wrong_service_message(principal, batch.service))
        if key is None:
            return await IngestEndpoint.store(app, batch, rid, headers, None)
        service = batch.service

        def replay(stored: idempotency.Stored) -> idempotency.Answer:
            content = msgspec.json.decode(stored.response)
            return stored.status, content, {**headers, idempotency.REPLAY_HEADER: "true"}

        async def lookup() -> idempotency.Stored | None:
            window = app.settings.idempotency_window_s
            return await app.storage.idempotency_lookup(service, key, window)

        return await app.idempotency.execute(
            service,
            key,
            idempotency.fingerprint(body),
            None if app.settings.ack_mode is AckMode.durable else lookup,
            lambda claim: IngestEndpoint.store(app, batch, rid, headers, claim),
            replay,
        )

    @staticmethod
    async def store(
        app: AppState,
        batch: Batch,
        rid: str,
        headers: dict[str, str],
        claim: idempotency.Claim | None,
    ) -> idempotency.Answer:
        """Commit the batch's valid metrics (with ``claim``, its idempotency key) and answer."""
        accepted = batch.accepted
        errors = [r.as_dict() for r in batch.rejections]
        result: dict[str, Any] = {
            "status": "success",
            "accepted": accepted,
            "rejected": len(errors),
            "errors": errors,
            "request_id": rid,
        }
        if accepted == 0:
            # Still every item's error (index, field, rule), as in a partial success.
            result["status"] = "error"
            result["error"] = {
                "code": "validation_failed",
                "message": "no metric in the request was valid",
                "details": errors,
            }
            result["detail"] = "no metric in the request was valid"
            status = 422
        else:
            status = 200
        if claim is not None:
            claim.status, claim.response = status, _encode(result)
        await app.queue.submit(batch, claim)
        app.on_ingested(batch)
        return status, result, headers


INGEST = IngestEndpoint()
# Starlette treats an endpoint that is not a function as an ASGI app (its type hint says otherwise).
router.add_route("/metrics", INGEST, methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]


@router.get("/rate-limit", tags=["ingest"], response_model=RateLimitStatus, responses=_ERRORS)
async def rate_limit(request: Request, x_api_key: APIKey = None) -> Response:
    """The calling key's budget; asking does not spend it."""
    app = state(request)
    principal = await app.authenticator.authenticate(
        x_api_key, client_address(request), "ingest", "admin", "viewer"
    )
    limit = principal.rate_limit_per_min or app.settings.rate_limit_per_min
    decision = await app.limiter.stats("key", str(principal.key_id), limit)
    reset = int(decision.reset_epoch_s)
    body = {
        "limit": limit,
        "remaining": decision.remaining,
        "reset": reset,
        # The same under the MCP Gateway Registry's names.
        "service": principal.service,
        "rate_limit": limit,
        "available_tokens": decision.remaining,
        "reset_time_seconds": max(0, reset - int(time.time())),
    }
    return json_response(body, 200, decision.headers())


@router.get("/health", tags=["health"])
async def health() -> Response:
    """Alive: the process answers."""
    return json_response({"status": "ok", "service": "metrics-collection"})


@router.get("/", tags=["health"])
async def root(request: Request) -> Response:
    """What this is and where its endpoints are."""
    return json_response(
        {
            "service": "MCP metrics service",
            "version": request.app.version,
            "status": "running",
            "endpoints": {
                "metrics": "/metrics",
                "health": "/health",
                "ready": "/ready",
                "flush": "/flush",
                "rate-limit": "/rate-limit",
                "analytics": "/analytics/summary",
                "ui": "/ui",
                "docs": "/docs",
            },
        }
    )


@router.post("/flush", tags=["ingest"], responses=_ERRORS)
async def flush(request: Request, x_api_key: APIKey = None) -> Response:
    """A no-op kept for the MCP Gateway Registry's clients: with durable acknowledgement every
    accepted metric is already committed when ``POST /metrics`` answers; in buffered mode the
    writer commits within METRICS_FLUSH_INTERVAL_S."""
    app = state(request)
    await app.authenticator.authenticate(x_api_key, client_address(request), "ingest", "admin")
    return json_response(
        {
            "status": "success",
            "message": "nothing to flush: accepted metrics are committed before POST /metrics"
            " answers"
            if app.settings.ack_mode.value == "durable"
            else f"buffered metrics are committed within {app.settings.flush_interval_s:g} s",
            "pending": app.queue.pending_metrics,
        }
    )


@router.get(
    "/ready",
    tags=["health"],
    responses={503: {"description": "Not ready; the same body names the failing check."}},
)
async def ready(request: Request) -> Response:
    """Ready: the database is writable and the writer is running."""
    checks = await state(request).readiness()
    ok = all(checks.values())
    return json_response(
        {"status": "ready" if ok else "not_ready", "checks": checks}, 200 if ok else 503
    )


@admin.get("/retention/policies", response_model=list[PolicyInfo])
async def list_policies(request: Request, _: Admin) -> Response:
    app = state(request)
    policies = await app.storage.retention_policies(app.settings.retention_days)
    return json_response(
        [
            {
                "table": p.table,
                "retention_days": p.retention_days,
                "is_default": p.is_default,
                "enabled": p.enabled,
                # The MCP Gateway Registry's names for the same.
                "table_name": p.table,
                "is_active": p.enabled,
            }
            for p in policies
        ]
    )


def _known_table(table: str) -> str:
    if table not in TABLES:
        raise NotFound(f"no such table; one of: {', '.join(TABLES)} (or metrics: all of them)")
    return table


def tables_named(name: str) -> list[str]:
    """A table name from a request: one of ours, or ``metrics`` (the MCP Gateway Registry's table
    of every event; here the view over all of them) for every raw table."""
    if name == "metrics":
        return list(TABLES)
    return [_known_table(name)]


def refuse_unknown_query(request: Request, allowed: tuple[str, ...]) -> None:
    """422 for a query parameter the endpoint does not take, instead of ignoring it."""
    unknown = [k for k in dict.fromkeys(request.query_params) if k not in allowed]
    if unknown:
        raise InvalidPayload(
            "unknown query parameter",
            details=[
                {
                    "field": k,
                    "rule": "unknown_parameter",
                    "message": f"one of: {', '.join(allowed)}",
                }
                for k in unknown
            ],
        )


async def refuse_body(request: Request, hint: str) -> None:
    if await request.body():
        raise InvalidPayload(
            "this endpoint takes no body",
            details=[{"field": "body", "rule": "empty", "message": hint}],
        )


@admin.put("/retention/policies/{table}", response_model=list[PolicyInfo])
async def update_policy(
    request: Request,
    table: str,
    _: Admin,
    update: PolicyUpdate | None = None,
    retention_days: Annotated[
        int | None, Query(ge=1, le=36_500, description="The query-parameter form: days to keep.")
    ] = None,
    is_active: Annotated[
        bool | None, Query(description="The query-parameter form: policy enabled.")
    ] = None,
) -> Response:
    """Set a table's policy: a JSON body (``retention_days``, ``enabled`` or ``is_active``), or
    the MCP Gateway Registry's query parameters ``retention_days`` and ``is_active``, whose answer
    takes its shape (with ``policies`` added)."""
    app = state(request)
    refuse_unknown_query(request, ("retention_days", "is_active"))
    names = tables_named(table)
    query_form = retention_days is not None or is_active is not None
    if update is not None and query_form:
        raise InvalidPayload(
            "give the policy either as a JSON body or as query parameters, not both",
            details=[{"field": "body", "rule": "exclusive", "message": "body or query, not both"}],
        )
    if update is None and retention_days is None:
        raise InvalidPayload(
            "retention_days is required",
            details=[
                {
                    "field": "retention_days",
                    "rule": "required",
                    "message": "a JSON body or the query parameter retention_days",
                }
            ],
        )
    if update is not None:
        days, enabled = update.retention_days, update.enabled
        if enabled is None:
            enabled = update.is_active
    else:
        days, enabled = retention_days, True if is_active is None else is_active

    await app.storage.set_retention_policy(names, days, enabled)
    listing = await list_policies(request, _)
    if not query_form:
        return listing
    return json_response(
        {
            "status": "success",
            "message": f"Updated retention policy for {table}",
            "table_name": table,
            "retention_days": days,
            "is_active": enabled,
            "policies": msgspec.json.decode(listing.body),
        }
    )


_CLEANUP_QUERY = ("dry_run", "table", "table_name")


@admin.post("/retention/cleanup")
async def cleanup(
    request: Request,
    _: Admin,
    dry_run: Annotated[
        bool,
        Query(
            description="Count what would be deleted, delete nothing (the default: delete "
            "only with dry_run=false)."
        ),
    ] = True,
    table: Annotated[str | None, Query(description="Only this table.")] = None,
    table_name: Annotated[str | None, Query(description="The same as table.")] = None,
) -> Response:
    """Apply the retention policies: a dry run unless ``dry_run=false`` (as on the MCP Gateway
    Registry's metrics-service)."""
    app = state(request)
    refuse_unknown_query(request, _CLEANUP_QUERY)
    await refuse_body(request, "pass dry_run=false and table_name as query parameters")
    if table is not None and table_name is not None and table != table_name:
        raise InvalidPayload(
            "table and table_name differ",
            details=[{"field": "table_name", "rule": "conflict", "message": "the same as table"}],
        )
    name = table if table is not None else table_name
    tables = tables_named(name) if name is not None else None
    started = time.time()
    results = await run_once(
        app.storage,
        app.settings,
        dry_run=dry_run,
        tables=tables,
        on_deleted=app.telemetry.on_retention_deleted,
    )
    completed = time.time()
    count_key = "records_would_delete" if dry_run else "records_deleted"
    return json_response(
        {
            "status": "success",
            "dry_run": dry_run,
            "tables": [r.as_dict() for r in results],
            # The MCP Gateway Registry's summary of the same run.
            "operation": "dry_run" if dry_run else "cleanup",
            "total_records_processed": sum(r.rows for r in results),
            "tables_processed": sum(1 for r in results if r.enabled),
            "duration_seconds": round(completed - started, 6),
            "started_at": _iso(started),
            "completed_at": _iso(completed),
            "table_results": {
                r.table: {
                    "table": r.table,
                    "status": "skipped"
                    if not r.enabled
                    else ("dry_run" if dry_run else "completed"),
                    count_key: r.rows,
                    "retention_days": r.retention_days,
                }
                for r in results
            },
        }
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


@admin.get("/db/stats")
async def db_stats(request: Request, _: Admin) -> Response:
    app = state(request)
    stats = await app.storage.stats()
    return json_response(stats)


@admin.get("/keys", response_model=list[KeyInfo])
async def list_keys(request: Request, _: Admin) -> Response:
    records = await state(request).storage.list_keys()
    return json_response([r.public() for r in records])


@admin.post("/keys", response_model=KeyCreated, status_code=201)
async def create_key(request: Request, body: KeyCreate, _: Admin) -> Response:
    app = state(request)
    if body.role == "ingest" and not body.service:
        raise InvalidPayload(
            "an ingest key needs a service",
            details=[
                {"field": "service", "rule": "required", "message": "required when role is ingest"}
            ],
        )
    if body.aliases and body.role != "ingest":
        raise InvalidPayload(
            "only an ingest key has service aliases",
            details=[
                {"field": "aliases", "rule": "ingest_only", "message": "only when role is ingest"}
            ],
        )
    secret, record = await auth.create_key(
        app.storage,
        service=body.service,
        role=body.role,
        rate_limit_per_min=body.rate_limit_per_min,
        source="api",
        description=body.description,
        aliases=tuple(body.aliases),
    )
    app.keys.add(record)
    log.info(
        "key %d created for %s (%s) through the admin API",
        record.id,
        record.service or "-",
        record.role,
    )
    return json_response({**record.public(), "key": secret}, 201)


@admin.delete("/keys/{key_id}", response_model=KeyInfo)
async def revoke_key(
    request: Request,
    key_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="The key's id.")],
    _: Admin,
) -> Response:
    app = state(request)
    record = await app.storage.revoke_key(key_id)
    if record is None:
        raise NotFound(f"no key with id {key_id}")
    app.keys.remove(key_id)
    log.info("key %d revoked through the admin API", key_id)
    return json_response(record.public())


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


#: ``POST /metrics`` in OpenAPI, written out: the endpoint is plain ASGI, not a FastAPI route.
_INGEST_OPERATION: dict[str, Any] = {
    "tags": ["ingest"],
    "summary": "Ingest a batch of metric events",
    "description": "Store the valid metrics of the batch; report each rejected one by index, "
    "field and rule.\n\n"
    "200: at least one metric stored (``rejected`` may be > 0). 422: none stored.\n"
    "With the default durable acknowledgement, 200 means committed to the database.",
    "operationId": "ingest_metrics_post",
    "parameters": [
        {
            "name": "X-API-Key",
            "in": "header",
            "required": False,
            "description": "The caller's API key.",
            "schema": {"type": "string"},
        },
        {
            "name": "Authorization",
            "in": "header",
            "required": False,
            "description": "`Bearer <key>`: the same key, in the form OTLP exporters send.",
            "schema": {"type": "string"},
        },
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "A unique key per batch, kept across its retries: a batch whose key "
            "was committed within METRICS_IDEMPOTENCY_WINDOW_S is not stored again and gets the "
            "first answer back, with `Idempotent-Replayed: true` (docs/delivery.md). 1 to 255 "
            'visible ASCII characters other than `"` and `\\`, bare or as a quoted string. '
            "Invalid: 400 `invalid_idempotency_key`; reused for another body: 422 "
            "`idempotency_key_reused`.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 257},
        },
    ],
    "requestBody": {"required": True, "content": _json_content("MetricsPayload")},
    "responses": {
        "200": {
            "description": "At least one metric stored.",
            "content": _json_content("IngestResult"),
        },
        **{
            str(code): {
                "description": spec["description"],
                "content": _json_content("ErrorResponse"),
            }
            for code, spec in _ERRORS.items()
        },
        "422": {
            "description": "No metric was valid, the body has the wrong shape, or the "
            "Idempotency-Key was used for another body.",
            "content": _json_content("ErrorResponse"),
        },
    },
}


def schema_components(app: FastAPI) -> None:
    """Add ``MetricsPayload``, ``IngestResult`` and ``POST /metrics`` (plain ASGI) to OpenAPI."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        defs = MetricsPayload.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.pop("$defs", {}))
        for model in (IngestResult, ErrorResponse):
            model_defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_defs.pop("$defs", {}))
            components.setdefault(model.__name__, model_defs)
        components["MetricsPayload"] = defs
        schema.setdefault("paths", {})["/metrics"] = {"post": _INGEST_OPERATION}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
