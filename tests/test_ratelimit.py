"""Rate limits are exact under concurrency, on memory and on a real redis-server shared by two
replicas; failed authentication is throttled per address."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx

from tests._helpers import INGEST_KEY, RedisServer, ServiceProcess, payload

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
