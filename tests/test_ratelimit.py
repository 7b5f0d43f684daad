"""Rate limits are exact under concurrency, on memory and on a real redis-server shared by two
replicas; the sliding window of one-second buckets never admits more than the limit in any
60 seconds and keeps bounded memory; failed authentication is throttled per address."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics_service.ratelimit import Decision, LimitsStore, MemoryStore, RateLimiter, RedisStore
from tests._helpers import INGEST_KEY, RedisServer, ServiceProcess, payload
from tests._ports import free_port

H = {"X-API-Key": INGEST_KEY}


async def burst(urls: list[str], n: int, headers: dict[str, str] = H) -> Counter[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    clients = [httpx.AsyncClient(base_url=u, timeout=30, limits=limits) for u in urls]
    try:
        # Open the connections first so the burst really arrives at once.
        await asyncio.gather(*(c.get("/health") for c in clients for _ in range(4)))
        responses = await asyncio.gather(
            *(
                clients[i % len(clients)].post("/metrics", json=payload(), headers=headers)
                for i in range(n)
            )
        )
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return Counter(r.status_code for r in responses)


def test_exactly_k_of_n_concurrent_requests_pass_in_memory(service: ServiceProcess) -> None:
    service.env["METRICS_RATE_LIMIT"] = "25"
    service.start()
    counts = asyncio.run(burst([service.url], 80))
    assert counts == {200: 25, 429: 55}


def test_exactly_k_pass_across_two_replicas_sharing_redis(
    service: ServiceProcess, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"METRICS_RATE_LIMIT": "30", "METRICS_RATE_LIMIT_STORAGE_URI": redis_server.url}
    service.env.update(env)
    service.start()
    replica = ServiceProcess(
        db_path=service.db_path, env=dict(service.env), log_path=tmp_path / "replica.log"
    )
    replica.start()
    try:
        counts = asyncio.run(burst([service.url, replica.url], 100))
        assert counts == {200: 30, 429: 70}
        # The budget is shared: a request to either replica is now refused.
        for url in (service.url, replica.url):
            r = httpx.post(url + "/metrics", json=payload(), headers=H)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        replica.stop()


# The window itself (metrics_service/ratelimit.py), on a clock the test moves.


class Clock:
    def __init__(self, now: float = 1_800_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_budget_frees_between_60_and_61_seconds_after_it_was_spent() -> None:
    clock = Clock()
    limiter = RateLimiter(store=MemoryStore(clock=clock))
    spent_at = clock.now
    assert all(asyncio.run(_hits(limiter, 3, 3)))
    refused = asyncio.run(limiter.hit("key", "k", 3))
    assert not refused.allowed and refused.remaining == 0
    assert spent_at + 60 <= refused.reset_epoch_s <= spent_at + 61
    clock.now = spent_at + 59.9
    assert not asyncio.run(limiter.hit("key", "k", 3)).allowed
    clock.now = refused.reset_epoch_s
    again = asyncio.run(limiter.hit("key", "k", 3))
    assert again.allowed and again.remaining == 2


async def _hits(limiter: RateLimiter, n: int, limit: int, key: str = "k") -> list[bool]:
    return [(await limiter.hit("key", key, limit)).allowed for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=7), min_size=1, max_size=400),
    limit=st.integers(min_value=1, max_value=40),
)
def test_never_more_than_the_limit_in_any_60_seconds(gaps: list[float], limit: int) -> None:
    """Requests at arbitrary times: at most ``limit`` admitted in any window of 60 s, and a
    request is refused only when ``limit`` were admitted in the 61 s before it."""
    clock = Clock()
    limiter = RateLimiter(store=MemoryStore(clock=clock))
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap
        decision = asyncio.run(limiter.hit("key", "k", limit))
        recent = [t for t in admitted if t > clock.now - 61]
        if decision.allowed:
            admitted.append(clock.now)
            in_window = [t for t in admitted if t > clock.now - 60]
            assert len(in_window) <= limit
        else:
            assert len(recent) >= limit
        # What is left: the limit less those admitted in this second's bucket and the 60 before.
        counted = [t for t in admitted if int(t) >= int(clock.now) - 60]
        assert decision.remaining == limit - len(counted)


def test_memory_stays_bounded_whatever_the_rate_and_the_number_of_keys() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    limiter = RateLimiter(store=store)

    async def load() -> None:
        for _ in range(200_000):  # 200,000 requests over 100 s on one key
            clock.now += 0.0005
            await limiter.hit("key", "hot", 10**9)
        for i in range(20_000):  # then 20,000 keys seen once each
            await limiter.hit("authfail", f"10.0.{i // 256}.{i % 256}", 5)

    asyncio.run(load())
    assert store.buckets("key/hot") <= 61
    clock.now += 62
    asyncio.run(_hits(limiter, 9000, 10**9, "late"))
    assert len(store) <= 2  # the idle keys were swept


def test_exactly_k_of_n_concurrent_hits_pass_on_redis(redis_server: RedisServer) -> None:
    async def main() -> tuple[list[bool], Decision, list[Decision]]:
        one = RateLimiter(redis_server.url)
        two = RateLimiter(redis_server.url)  # another replica's limiter
        results = await asyncio.gather(
            *((one if i % 2 else two).hit("key", "shared", 30) for i in range(100))
        )
        stats = await one.stats("key", "shared", 30)
        await one.close()
        await two.close()
        return [r.allowed for r in results], stats, results

    allowed, stats, results = asyncio.run(main())
    assert allowed.count(True) == 30
    assert not stats.allowed and stats.remaining == 0
    # Which 30 pass depends on the order the two connections reach Redis, not on the order of
    # the calls; every refused one says when to retry.
    refused = [r for r in results if not r.allowed]
    assert len(refused) == 70 and all(1 <= r.retry_after_s <= 61 for r in refused)
    assert sorted(r.remaining for r in results if r.allowed) == list(range(30))


def test_a_redis_budget_frees_after_its_window(redis_server: RedisServer) -> None:
    """A 2-second window (the per-minute one, shortened): spent, refused, then free again no
    sooner than 2 s after it was spent."""

    async def main() -> tuple[float, float]:
        limiter = RateLimiter(store=RedisStore(redis_server.url, window_s=2))
        started = time.time()
        assert all([(await limiter.hit("key", "w", 2)).allowed for _ in range(2)])
        assert not (await limiter.hit("key", "w", 2)).allowed
        deadline = started + 10
        while not (await limiter.stats("key", "w", 2)).allowed:
            assert time.time() < deadline, "the budget never freed"
            await asyncio.sleep(0.05)
        freed = time.time()
        assert (await limiter.hit("key", "w", 2)).allowed
        await limiter.close()
        return started, freed

    started, freed = asyncio.run(main())
    assert freed - started >= 1.0  # its bucket's second plus the whole window, less the part


def test_ingest_fails_open_when_redis_is_down(service: ServiceProcess) -> None:
    service.env.update(
        {
            "METRICS_RATE_LIMIT": "1",
            "METRICS_RATE_LIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}",
        }
    )
    service.start()
    codes = [
        httpx.post(service.url + "/metrics", json=payload(), headers=H).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 200]
    assert "rate-limit storage failed" in service.log()


def test_the_limits_fallback_for_sentinel_and_cluster_is_exact_too() -> None:
    """Sentinel and cluster URIs keep ``limits``' moving window behind the same interface; its
    memory storage stands in here for the same code path."""

    async def main() -> tuple[list[bool], Decision]:
        limiter = RateLimiter(store=LimitsStore("memory://"))
        results = await asyncio.gather(*(limiter.hit("key", "s", 7) for _ in range(20)))
        return [r.allowed for r in results], await limiter.stats("key", "s", 7)

    allowed, stats = asyncio.run(main())
    assert allowed.count(True) == 7
    assert not stats.allowed and stats.remaining == 0
