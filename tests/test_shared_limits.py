"""Budgets shared through one real redis-server by two service processes on one database: the
ingest key limit (``limits``), the route limits (slowapi) and the failed-auth throttle are exact
across both under concurrent load."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests._helpers import ADMIN_KEY, INGEST_KEY, RedisServer, ServiceProcess, db_rows, payload


@dataclass(frozen=True)
class Call:
    url: str
    method: str
    path: str
    headers: dict[str, str]
    local_address: str = "127.0.0.1"


async def _fire(calls: list[Call]) -> list[httpx.Response]:
    """Every call at once, each (replica, source address) on connections opened beforehand."""
    groups = {(c.url, c.local_address) for c in calls}
    clients = {}
    for url, address in groups:
        n = sum(1 for c in calls if (c.url, c.local_address) == (url, address))
        transport = httpx.AsyncHTTPTransport(
            local_address=address, limits=httpx.Limits(max_connections=n)
        )
        clients[url, address] = httpx.AsyncClient(base_url=url, timeout=30, transport=transport)
    try:
        await asyncio.gather(*(c.get("/health") for c in clients.values() for _ in range(8)))

        def send(c: Call) -> Any:
            client = clients[c.url, c.local_address]
            if c.method == "POST":
                return client.post(c.path, json=payload(), headers=c.headers)
            return client.get(c.path, headers=c.headers)

        return list(await asyncio.gather(*(send(c) for c in calls)))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients.values()))


def fire(calls: list[Call]) -> list[httpx.Response]:
    return asyncio.run(_fire(calls))


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


@pytest.fixture
def replicas(
    service: ServiceProcess, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two service processes on one database and one Redis; set ``service.env`` before use
    through ``start_both``."""
    service.env["METRICS_RATE_LIMIT_STORAGE_URI"] = redis_server.url
    other = ServiceProcess(
        db_path=service.db_path, env=service.env, log_path=tmp_path / "replica.log"
    )
    yield service, other
    other.stop()


def start_both(replicas: tuple[ServiceProcess, ServiceProcess], **env: str) -> list[str]:
    for replica in replicas:
        replica.env.update(env)
        replica.start()
    return [r.url for r in replicas]


def test_key_and_route_budgets_are_exact_across_two_replicas_under_mixed_load(
    replicas: tuple[ServiceProcess, ServiceProcess], redis_server: RedisServer
) -> None:
    urls = start_both(
        replicas,
        METRICS_RATE_LIMIT="30",
        METRICS_ANALYTICS_RATE_LIMIT="20/minute",
        METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS="25/minute",
    )
    ingest = {"X-API-Key": INGEST_KEY}
    bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}
    calls = [
        *(Call(urls[i % 2], "POST", "/metrics", ingest) for i in range(80)),
        *(Call(urls[i % 2], "GET", "/analytics/summary", bearer) for i in range(60)),
        *(Call(urls[i % 2], "GET", "/ui", {}, "127.0.0.2") for i in range(60)),
    ]
    responses = fire(calls)
    by_kind: dict[str, Counter[int]] = {"/metrics": Counter(), "/analytics": Counter()}
    by_kind["/ui"] = Counter()
    served = Counter[str]()
    for call, r in zip(calls, responses, strict=True):
        by_kind[call.path.split("/summary")[0]][r.status_code] += 1
        if r.status_code == 200:
            served[call.url] += 1
    # The ingest key budget (metrics_service/ratelimit.py's window on Redis), the analytics key
    # budget and the address budget (slowapi): each exact across both replicas, none spending
    # another.
    assert by_kind == {
        "/metrics": {200: 30, 429: 50},
        "/analytics": {200: 20, 429: 40},
        "/ui": {200: 25, 429: 35},
    }
    assert all(served[url] > 0 for url in urls)  # both replicas took part
    assert db_rows(replicas[0].db_path, "SELECT count(*) FROM custom_metrics") == [(30,)]
    # Spent is spent on either replica.
    for url in urls:
        assert httpx.get(url + "/analytics/tools", headers=bearer).status_code == 429
        assert httpx.post(url + "/metrics", json=payload(), headers=ingest).status_code == 429
    # The route budgets live in Redis, apart from the ingest ones.
    store = redis.Redis.from_url(redis_server.url)
    try:
        names = [k.decode() for k in store.scan_iter("LIMITS:LIMITER/*")]
        ingest_names = [k.decode() for k in store.scan_iter("metrics-service:rl:*")]
    finally:
        store.close()
    assert any(n.startswith("LIMITS:LIMITER/routes/key:") for n in names), names
    assert any(n.startswith("LIMITS:LIMITER/routes/address:127.0.0.2/") for n in names), names
    assert not any(n.startswith("LIMITS:LIMITER/key/") for n in names), names
    assert any(n.startswith("metrics-service:rl:key/") for n in ingest_names), ingest_names


def test_the_failed_auth_budget_of_an_address_is_shared_by_both_replicas(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    urls = start_both(
        replicas, METRICS_AUTH_FAILURE_LIMIT="15", METRICS_TRUSTED_PROXIES="127.0.0.1"
    )
    guess = {"X-API-Key": "mcpm_" + "G" * 43, "X-Forwarded-For": "203.0.113.5"}
    paths = [("POST", "/metrics"), ("GET", "/analytics/summary"), ("GET", "/admin/keys")]
    calls = [Call(urls[i % 2], *paths[i % 3], guess) for i in range(60)]
    responses = fire(calls)
    # Guesses on any path of either replica draw on one budget: exactly 15 are told 401.
    assert statuses(responses) == {401: 15, 429: 45}
    # (Alone, each replica would have told 15 of its 30 guesses 401: 30 in all.)
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 61
    for url in urls:
        # That client stays refused everywhere, with any wrong or missing key ...
        blocked = {"X-Forwarded-For": "203.0.113.5"}
        assert httpx.get(url + "/analytics/summary", headers=blocked).status_code == 429
        # ... another client behind the same proxy is not ...
        fresh = {**guess, "X-Forwarded-For": "203.0.113.6"}
        assert httpx.post(url + "/metrics", json=payload(), headers=fresh).status_code == 401
        # ... and a valid key from the throttled address still passes (shared NAT addresses).
        valid = {"X-API-Key": INGEST_KEY, "X-Forwarded-For": "203.0.113.5"}
        assert httpx.post(url + "/metrics", json=payload(), headers=valid).status_code == 200
