"""Per-key rate limits of the ingest paths: an exact sliding window of one-second buckets, in
memory or on Redis.

A budget of N per minute admits a request when fewer than N were admitted in the buckets of the
last 61 seconds: the current second's bucket and the 60 before it. A request is counted in the
bucket of the second it arrived in and forgotten when that whole bucket is more than 60 seconds
old, so never more than N pass in any 60 seconds, and an admitted request frees its place between
60 and 61 seconds after it arrived. The check and the count are one atomic step (on memory one
event loop with no ``await`` between them, on Redis one Lua script on the server's clock), so with
k left and n > k arriving at once, exactly k pass, across every replica sharing the Redis.

Each key holds at most 61 counters, whatever its rate. The moving window of ``limits`` that this
replaces kept one entry per request in the window (a key at 5,000 requests/s held 300,000) and
spent 12-35 us per request expiring them (see docs/performance.md).

``METRICS_RATE_LIMIT_STORAGE_URI``: ``memory://`` (one process), ``redis://`` or ``rediss://``
(shared by the replicas; redis-py with retries off, so that a lost connection never runs the
script twice and spends two places for one request). Sentinel and cluster URIs keep the moving
window of ``limits``, which supports them.

If the Redis storage fails, requests are let through (fail open) and the failure is logged once
per outage: a metrics pipeline should not drop data because its rate-limit store is down.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: The window, in seconds, of a per-minute budget.
WINDOW_S = 60
#: Sweep the memory store for idle keys once per this many hits.
_SWEEP_EVERY = 8192


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


class _Store(Protocol):
    async def take(self, key: str, limit: int, cost: int) -> tuple[bool, int, float]:
        """Spend ``cost`` places of ``key``'s budget if that many are left (0: only look):
        (allowed, places used after it, epoch second at which the oldest counted bucket
        frees)."""
        ...

    async def check(self) -> bool: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class _Window:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, count], oldest first
        self.total = 0


class MemoryStore:
    """The windows of one process."""

    def __init__(self, window_s: int = WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._hits = 0

    def __len__(self) -> int:
        return len(self._windows)

    def buckets(self, key: str) -> int:
        window = self._windows.get(key)
        return 0 if window is None else len(window.buckets)

    async def take(self, key: str, limit: int, cost: int) -> tuple[bool, int, float]:
        second = int(self._clock())
        oldest_kept = second - self._window_s
        window = self._windows.get(key)
        if window is None:
            if cost == 0:
                return True, 0, second
            window = self._windows[key] = _Window()
        buckets = window.buckets
        while buckets and buckets[0][0] < oldest_kept:
            window.total -= buckets.popleft()[1]
        allowed = window.total + cost <= limit if cost else window.total < limit
        if allowed and cost:
            if buckets and buckets[-1][0] == second:
                buckets[-1][1] += cost
            else:
                buckets.append([second, cost])
            window.total += cost
            self._hits += 1
            if self._hits >= _SWEEP_EVERY:
                self._sweep(oldest_kept)
        frees = buckets[0][0] + self._window_s + 1 if buckets else second
        return allowed, window.total, frees

    def _sweep(self, oldest_kept: int) -> None:
        """Forget the keys whose every bucket is out of the window (bounded memory)."""
        self._hits = 0
        idle = [
            k for k, w in self._windows.items() if not w.buckets or w.buckets[-1][0] < oldest_kept
        ]
        for key in idle:
            del self._windows[key]

    async def check(self) -> bool:
        return True

    async def reset(self) -> None:
        self._windows.clear()

    async def close(self) -> None:
        return None


#: KEYS[1] the key's hash (field: epoch second, value: count); ARGV limit, window, cost.
#: Returns {allowed, used, second the oldest counted bucket frees}. The server's clock, so that
#: replicas with different clocks share one window.
_TAKE = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local second = tonumber(redis.call('TIME')[1])
local oldest_kept = second - window
local fields = redis.call('HGETALL', key)
local used = 0
local oldest = nil
for i = 1, #fields, 2 do
  local s = tonumber(fields[i])
  if s < oldest_kept then
    redis.call('HDEL', key, fields[i])
  else
    used = used + tonumber(fields[i + 1])
    if oldest == nil or s < oldest then oldest = s end
  end
end
local allowed = 0
if cost > 0 then
  if used + cost <= limit then
    redis.call('HINCRBY', key, second, cost)
    redis.call('EXPIRE', key, window + 2)
    used = used + cost
    allowed = 1
    if oldest == nil then oldest = second end
  end
elseif used < limit then
  allowed = 1
end
if oldest == nil then return {allowed, used, second} end
return {allowed, used, oldest + window + 1}
"""


class RedisStore:
    """The windows shared by every replica on one Redis."""

    PREFIX = "metrics-service:rl:"

    def __init__(self, uri: str, window_s: int = WINDOW_S) -> None:
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._window_s = window_s
        # No retries: the script may have run before the connection broke.
        self._client: Any = redis.asyncio.Redis.from_url(uri, retry=Retry(NoBackoff(), 0))
        self._script = self._client.register_script(_TAKE)

    async def take(self, key: str, limit: int, cost: int) -> tuple[bool, int, float]:
        allowed, used, frees = await self._script(
            keys=[self.PREFIX + key], args=[limit, self._window_s, cost]
        )
        return bool(allowed), int(used), float(frees)

    async def check(self) -> bool:
        return bool(await self._client.ping())

    async def reset(self) -> None:
        async for key in self._client.scan_iter(match=self.PREFIX + "*"):
            await self._client.delete(key)

    async def close(self) -> None:
        await self._client.aclose()


class LimitsStore:
    """Sentinel and cluster URIs: the moving window of ``limits`` (one entry per request)."""

    def __init__(self, uri: str) -> None:
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import Storage as AsyncStorage
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        # redis-py, not coredis: coredis retries a script after "connection lost", which can
        # run the acquire script twice and spend two entries for one request.
        storage = storage_from_string(f"async+{uri}", implementation="redispy")
        if not isinstance(storage, AsyncStorage):
            raise ValueError(f"{uri!r} is not an asyncio storage")
        self._storage = storage
        self._strategy = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerMinute
        self._items: dict[int, Any] = {}

    async def take(self, key: str, limit: int, cost: int) -> tuple[bool, int, float]:
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = self._item(limit)
        allowed = await self._strategy.hit(item, key) if cost else True
        reset, remaining = await self._strategy.get_window_stats(item, key)
        if not cost:
            allowed = remaining > 0
        return allowed, limit - max(0, remaining), reset

    async def check(self) -> bool:
        return bool(await self._storage.check())

    async def reset(self) -> None:
        await self._storage.reset()

    async def close(self) -> None:
        return None


def store_for(uri: str) -> _Store:
    scheme = uri.split("://", 1)[0]
    if scheme == "memory":
        return MemoryStore()
    if scheme in ("redis", "rediss"):
        return RedisStore(uri)
    return LimitsStore(uri)


class RateLimiter:
    """Budgets of ``limit`` requests per minute, per namespace and identifier."""

    def __init__(self, storage_uri: str = "memory://", store: _Store | None = None) -> None:
        self._store = store if store is not None else store_for(storage_uri)
        self._failing = False

    async def _take(self, namespace: str, ident: str, limit: int, cost: int) -> Decision:
        try:
            allowed, used, frees = await self._store.take(f"{namespace}/{ident}", limit, cost)
        except Exception:
            self._storage_failed()
            return Decision(True, limit, limit, time.time() + WINDOW_S)
        if self._failing:
            log.warning("rate-limit storage is back")
            self._failing = False
        return Decision(allowed, limit, max(0, limit - used), frees)

    async def hit(self, namespace: str, ident: str, limit: int) -> Decision:
        """Take one request from the budget; ``allowed`` says whether there was one."""
        return await self._take(namespace, ident, limit, 1)

    async def stats(self, namespace: str, ident: str, limit: int) -> Decision:
        """The budget left, spending nothing (fails open like ``hit``)."""
        return await self._take(namespace, ident, limit, 0)

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
            return await self._store.check()
        except Exception:
            return False

    async def reset(self) -> None:
        await self._store.reset()

    async def close(self) -> None:
        """Release the storage's connections (Redis); the limiter is not used afterwards."""
        await self._store.close()
