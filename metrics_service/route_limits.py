"""Per-key and per-address request limits on the regular routes, through slowapi.

The regular routes are the FastAPI ones: ``/analytics/*``, ``/admin/*``, ``/rate-limit``,
``/flush``, ``/``, ``/ui`` and its assets, ``/docs``. Each request spends

- its key's budget, when it presents a key (``X-API-Key`` or ``Authorization: Bearer``):
  ``METRICS_ANALYTICS_RATE_LIMIT`` shared by every analytics view (the expensive queries), or
  ``METRICS_ROUTE_RATE_LIMIT`` shared by the admin routes, ``/rate-limit`` and ``/flush``;
- and its client address's budget, ``METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS``, shared by every
  regular route (the address as the failed-auth throttle sees it: ``X-Forwarded-For`` only from
  ``METRICS_TRUSTED_PROXIES``).

``/health`` and ``/ready`` are never limited (a 429 on a probe would take a healthy replica out of
rotation). Over a budget the answer is 429 in the usual error body with ``Retry-After``.

The ingest routes (``POST /metrics``, ``/v1/traces``) do not come through here: they are plain
ASGI, dispatched before FastAPI, and keep ``metrics_service.ratelimit`` (``limits`` with asyncio
storage, the engine under slowapi); see docs/operations.md for why and what it costs.

slowapi's ``Limiter`` is made per app from the settings (its storage is the one of
``METRICS_RATE_LIMIT_STORAGE_URI``, so Redis shares route budgets between replicas too). Its
decorators want a module-level limiter over route functions; ours are built per app, so each
budget class has a small guard function that the limiter decorates, and one FastAPI dependency
(on the routers, in ``create_app``) runs the guard of the request's route before the endpoint —
before authentication, so a refused request costs no database work. slowapi's storage is
synchronous: on Redis the guard runs in a worker thread of the loop's default executor, so a
round trip never holds up the event loop (which ingest shares); a hung Redis holds a check at most
``REDIS_TIMEOUT_S`` per call. In memory it runs on the loop (no I/O). If the storage fails,
requests pass (fail open, as on the ingest path) and the failure is logged once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from limits import RateLimitItem
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded

from metrics_service import auth
from metrics_service.api import client_address, error_response
from metrics_service.errors import RateLimited
from metrics_service.settings import Settings

log = logging.getLogger(__name__)

#: Paths that are never limited: the probes.
EXEMPT_PATHS = frozenset({"/health", "/ready"})
#: A hung Redis holds a route check at most this long per call (slowapi's storage is sync).
REDIS_TIMEOUT_S = 0.25
#: slowapi logs every request it lets through while the storage is down; we keep one a minute.
STORAGE_ERROR_LOG_INTERVAL_S = 60.0

Guard = Callable[[Request], None]


@dataclass(frozen=True, slots=True)
class Budget:
    """One class of budget: what it is shared by, what it is keyed on, where it is set."""

    scope: str
    subject: str  # "key" or "address"
    variable: str

    @property
    def message(self) -> str:
        on = "the analytics routes" if self.scope == "analytics" else "the regular routes"
        return f"too many requests to {on} from this {self.subject}; see Retry-After"


ANALYTICS = Budget("analytics", "key", "METRICS_ANALYTICS_RATE_LIMIT")
ROUTES = Budget("routes", "key", "METRICS_ROUTE_RATE_LIMIT")
ADDRESS = Budget("address", "address", "METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS")
_BUDGETS = {b.scope: b for b in (ANALYTICS, ROUTES, ADDRESS)}


def route_class(path: str) -> str | None:
    """Which key budget the route at ``path`` spends: ``analytics``, ``routes``, ``page`` (the
    address budget only) or None (never limited)."""
    if path in EXEMPT_PATHS:
        return None
    if path.startswith("/analytics/"):
        return "analytics"
    if path.startswith("/admin/") or path in ("/rate-limit", "/flush"):
        return "routes"
    return "page"


def _presented_hash(request: Request) -> str | None:
    """The key the request presents, as the digest the key table stores (never the secret)."""
    cached = request.scope.get("route_limits.key", False)
    if cached is not False:
        return cast("str | None", cached)
    presented = auth.presented_key(
        request.headers.get("x-api-key"), request.headers.get("authorization")
    )
    digest = auth.hash_key(presented)[:32] if presented else None
    request.scope["route_limits.key"] = digest
    return digest


def _key_of(request: Request) -> str:
    # By the presented key, not by the key table: the bucket is the same on every replica
    # whether or not it has loaded a new key yet, and nothing is looked up before auth.
    return f"key:{_presented_hash(request)}"


def _address_of(request: Request) -> str:
    return "address:" + client_address(request)


class _OncePerInterval(logging.Filter):
    """Passes one record of slowapi's swallowed storage errors per interval, and none of its
    warnings about each refused request."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exceeded at endpoint" in message:
            return False  # every 429 would log a warning; the ingest limiter logs none either
        if "Swallowing error" not in message:
            return True
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return False
        self._last = now
        return True


_slowapi_log = logging.getLogger("slowapi")
if not any(isinstance(f, _OncePerInterval) for f in _slowapi_log.filters):
    _slowapi_log.addFilter(_OncePerInterval(STORAGE_ERROR_LOG_INTERVAL_S))


class RouteLimits:
    """The slowapi limiter of one app and the guard of each route class."""

    def __init__(self, settings: Settings) -> None:
        uri = settings.rate_limit_storage_uri
        #: Storage round trips go to a worker thread (Redis), not the event loop.
        self._in_thread = uri.startswith("redis")
        options: dict[str, Any] = {}
        if uri.startswith("redis"):
            options = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
        self.limiter = Limiter(
            key_func=_address_of,
            storage_uri=uri,
            storage_options=options,
            # Exact like the ingest limits: with k requests left and n > k at once, k pass.
            strategy="moving-window",
            key_prefix="routes",
            # Fail open, as the ingest limiter does: a limiter outage must not take the API down.
            swallow_errors=True,
            # The 429 carries the headers (see ``refused``); a 200 keeps its own (``/rate-limit``
            # reports the ingest budget in X-RateLimit-*).
            headers_enabled=False,
        )
        per_address = self._limit(settings.route_rate_limit_per_address, ADDRESS, _address_of)

        # Plain functions: slowapi's check is synchronous, and on Redis it runs in a worker thread
        # (``check``), so the event loop never waits for a round trip.
        def analytics_guard(request: Request) -> None:
            return None

        def routes_guard(request: Request) -> None:
            return None

        def page_guard(request: Request) -> None:
            return None

        # Limits are checked in the order they were added (the inner decorator's first), and a
        # request refused by one has spent the ones before it: the key budget comes first.
        self._guards: dict[str, Guard] = {
            "analytics": per_address(
                self._limit(settings.analytics_rate_limit, ANALYTICS, _key_of)(analytics_guard)
            ),
            "routes": per_address(
                self._limit(settings.route_rate_limit, ROUTES, _key_of)(routes_guard)
            ),
            "page": per_address(page_guard),
        }

    def _limit(
        self, value: str, budget: Budget, key_func: Callable[[Request], str]
    ) -> Callable[[Guard], Guard]:
        decorator = self.limiter.shared_limit(
            value,
            scope=budget.scope,
            key_func=key_func,
            error_message=budget.message,
        )
        return cast("Callable[[Guard], Guard]", decorator)

    async def check(self, request: Request) -> None:
        """Spend the request's budgets; raises slowapi's ``RateLimitExceeded`` when one is out."""
        route = request.scope.get("route")
        path = getattr(route, "path", None) or request.scope.get("path", "")
        kind = route_class(path)
        if kind is not None and kind != "page" and _presented_hash(request) is None:
            # No key, no key budget: the address budget (and the failed-auth throttle) bound it.
            kind = "page"
        if kind is not None:
            # slowapi reads it after the guard even when a storage error was swallowed before
            # it was set (an AttributeError, a 500, instead of failing open).
            request.state.view_rate_limit = None
            guard = self._guards[kind]
            if self._in_thread:
                await asyncio.to_thread(guard, request)
            else:
                guard(request)  # memory: a few µs, no I/O

    async def retry_after_s(self, request: Request, item: RateLimitItem) -> tuple[int, int]:
        """Seconds until the refused budget frees a request, and its reset as epoch seconds."""
        now = time.time()
        reset = now + item.get_expiry()
        hit = getattr(request.state, "view_rate_limit", None)
        if hit is not None:
            try:
                stats = self.limiter.limiter.get_window_stats
                if self._in_thread:
                    window = await asyncio.to_thread(stats, hit[0], *hit[1])
                else:
                    window = stats(hit[0], *hit[1])
                reset = float(window.reset_time)
            except Exception:
                log.debug("route-limit window stats unavailable", exc_info=True)
        return max(1, math.ceil(reset - now)), math.ceil(reset)


async def enforce(request: Request) -> None:
    """The dependency on every regular route (see ``dependencies``)."""
    limits: RouteLimits = request.app.state.route_limits
    await limits.check(request)


def dependencies() -> list[Any]:
    """What ``include_router(..., dependencies=...)`` takes for the regular routers."""
    return [Depends(enforce)]


async def refused(request: Request, exc: Exception) -> Response:
    """slowapi's 429, in the project's error body, with ``Retry-After`` and ``X-RateLimit-*``."""
    assert isinstance(exc, RateLimitExceeded)
    limit = exc.limit
    assert limit is not None
    item: RateLimitItem = limit.limit
    budget = _BUDGETS.get(limit.scope, ADDRESS)
    limits: RouteLimits = request.app.state.route_limits
    retry_after, reset = await limits.retry_after_s(request, item)
    error = RateLimited(
        budget.message,
        details=[
            {
                "field": "X-API-Key" if budget.subject == "key" else "client_address",
                "rule": "rate_limit",
                "message": f"{item} for the {budget.scope} budget ({budget.variable})",
            }
        ],
        headers={
            "Retry-After": str(retry_after),
            "X-RateLimit-Limit": str(item.amount),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        },
    )
    return error_response(request, error)


def install(app: FastAPI, settings: Settings) -> None:
    """Give ``app`` its route limiter and the 429 handler (``create_app`` calls it)."""
    app.state.route_limits = RouteLimits(settings)
    app.add_exception_handler(RateLimitExceeded, refused)
