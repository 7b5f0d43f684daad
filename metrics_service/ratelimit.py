"""Per-key rate limits on the `limits` library (the engine under slowapi), asyncio storage.

We use `limits` directly rather than slowapi's route decorators: the budget of a request depends on
the key, known only after authentication, and slowapi's storage is synchronous, which would block
the event loop on Redis. The moving-window strategy is exact: with k requests of budget left and
n > k arriving at once, exactly k pass, on memory (one event loop, per-key lock) and on Redis
(one Lua script per hit). ``METRICS_RATE_LIMIT_STORAGE_URI=redis://...`` shares budgets between
replicas.

If the Redis storage fails, requests are let through (fail open) and the failure is logged:
a metrics pipeline should not drop data because its rate-limit store is down.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import Storage as AsyncStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_epoch_s: float

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_epoch_s - time.time()))

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_epoch_s)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    """Moving-window limits, per namespace and identifier, ``limit`` requests per minute."""

    def __init__(self, storage_uri: str = "async+memory://") -> None:
        options = {}
        if "redis" in storage_uri:
            # redis-py, not coredis: coredis retries a script after "connection lost", which can
            # run the acquire script twice and spend two entries for one request.
            options["implementation"] = "redispy"
        storage = storage_from_string(storage_uri, **options)
        if not isinstance(storage, AsyncStorage):
            raise ValueError(f"{storage_uri!r} is not an asyncio storage (use async+...)")
        self._storage = storage
        self._strategy = MovingWindowRateLimiter(self._storage)
        self._items: dict[int, RateLimitItem] = {}
        self._failing = False

    def _item(self, limit: int) -> RateLimitItem:
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = RateLimitItemPerMinute(limit)
        return item

    async def hit(self, namespace: str, ident: str, limit: int) -> Decision:
        """Take one request from the budget; ``allowed`` says whether there was one."""
        item = self._item(limit)
        try:
            allowed = await self._strategy.hit(item, namespace, ident)
            reset, remaining = await self._strategy.get_window_stats(item, namespace, ident)
        except Exception:
            self._storage_failed()
            return Decision(True, limit, limit, time.time() + 60)
        if self._failing:
            log.warning("rate-limit storage is back")
            self._failing = False
        return Decision(allowed, limit, max(0, remaining), reset)

    async def stats(self, namespace: str, ident: str, limit: int) -> Decision:
        """The budget left, spending nothing (fails open like ``hit``)."""
        item = self._item(limit)
        try:
            reset, remaining = await self._strategy.get_window_stats(item, namespace, ident)
        except Exception:
            self._storage_failed()
            return Decision(True, limit, limit, time.time() + 60)
        return Decision(remaining > 0, limit, max(0, remaining), reset)

    async def peek_exhausted(self, namespace: str, ident: str, limit: int) -> int | None:
        """Seconds until the budget frees up if it is exhausted, else None (takes nothing)."""
        decision = await self.stats(namespace, ident, limit)
        return None if decision.allowed else decision.retry_after_s

    def _storage_failed(self) -> None:
        """The storage is down: fail open, and say so once per outage."""
        if not self._failing:
            log.exception("rate-limit storage failed; letting requests through")
            self._failing = True

    async def check(self) -> bool:
        try:
            return bool(await self._storage.check())
        except Exception:
            return False

    async def reset(self) -> None:
        await self._storage.reset()
