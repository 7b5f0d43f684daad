"""Route limits (slowapi) on the regular routes: per key and per client address, exact under
concurrency, 429 in the project's error body with Retry-After; the ingest path and the probes are
not limited by them. A real service process on a temporary database, over real HTTP."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from metrics_service.errors import ConfigError
from metrics_service.settings import load_settings
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    RedisServer,
    ServiceProcess,
    db_rows,
    free_port,
    payload,
    run_bench,
)

ADMIN = {"X-API-Key": ADMIN_KEY}


def viewer_key(service: ServiceProcess) -> str:
    r = httpx.post(service.url + "/admin/keys", json={"role": "viewer"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


async def _burst(
    url: str, requests: list[tuple[str, dict[str, str]]], local_address: str = "127.0.0.1"
) -> list[httpx.Response]:
    """``requests`` (path, headers) as GETs, all at once, on connections opened beforehand."""
    n = len(requests)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    transport = httpx.AsyncHTTPTransport(local_address=local_address, limits=limits)
    async with httpx.AsyncClient(base_url=url, timeout=30, transport=transport) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(min(n, 16))))
        return list(await asyncio.gather(*(client.get(path, headers=h) for path, h in requests)))


def burst(url: str, requests: list[tuple[str, dict[str, str]]], **kw: Any) -> list[httpx.Response]:
    return asyncio.run(_burst(url, requests, **kw))


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


def assert_route_429(r: httpx.Response, field: str, variable: str, limit: int) -> None:
    """The project's error body, naming the budget, with Retry-After and X-RateLimit-*."""
    assert r.status_code == 429
    body = r.json()
    assert body["error"]["code"] == "rate_limited"
    assert body["request_id"] == r.headers["x-request-id"]
    (detail,) = body["error"]["details"]
    assert detail["field"] == field and detail["rule"] == "rate_limit"
    assert variable in detail["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit"] == str(limit)
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert int(r.headers["x-ratelimit-reset"]) >= time.time()


def test_analytics_budget_is_per_key_exact_under_concurrency_and_shared_by_every_view(
    service: ServiceProcess,
) -> None:
    service.env.update({"METRICS_ANALYTICS_RATE_LIMIT": "12/minute", "METRICS_RATE_LIMIT": "50"})
    service.start()
    first, second = viewer_key(service), viewer_key(service)
    views = ["/analytics/summary", "/analytics/tools", "/analytics/timeseries", "/analytics/auth"]
    responses = burst(service.url, [(views[i % 4], {"X-API-Key": first}) for i in range(40)])
    assert statuses(responses) == {200: 12, 429: 28}
    for r in responses:
        if r.status_code == 429:
            assert_route_429(r, "X-API-Key", "METRICS_ANALYTICS_RATE_LIMIT", 12)
    # Another key has its own budget; the same key is refused on every view.
    assert statuses(burst(service.url, [("/analytics/users", {"X-API-Key": second})] * 5)) == {
        200: 5
    }
    assert (
        httpx.get(service.url + "/analytics/clients", headers={"X-API-Key": first}).status_code
        == 429
    )
    # Bearer presents the same key, so the same budget.
    bearer = {"Authorization": f"Bearer {first}"}
    assert httpx.get(service.url + "/analytics/summary", headers=bearer).status_code == 429
    # The analytics budget is not the ingest one: the key's /rate-limit (which spends nothing)
    # still shows all of METRICS_RATE_LIMIT, and ingest is untouched by the analytics refusals.
    status = httpx.get(service.url + "/rate-limit", headers={"X-API-Key": first}).json()
    assert status["limit"] == status["remaining"] == 50
    ingest = httpx.post(service.url + "/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY})
    assert ingest.status_code == 200
    assert "exceeded at endpoint" not in service.log()  # no warning per refused request


def test_a_missing_key_spends_no_key_budget_and_meets_the_failed_auth_throttle(
    service: ServiceProcess,
) -> None:
    service.env.update(
        {"METRICS_ANALYTICS_RATE_LIMIT": "2/minute", "METRICS_AUTH_FAILURE_LIMIT": "4"}
    )
    service.start()
    summary = service.url + "/analytics/summary"
    # No key: four 401s (a key budget of 2 would have answered 429 from the third), then the
    # failed-auth throttle of the address.
    assert [httpx.get(summary).status_code for _ in range(4)] == [401] * 4
    r = httpx.get(summary)
    assert r.status_code == 429 and "failed authentication" in r.json()["error"]["message"]
    # A wrong key is a presented key: it has a budget of its own like any other (by its hash,
    # the same on every replica whether or not a replica has loaded the key yet).
    wrong = {"X-API-Key": "mcpm_" + "Z" * 43}
    r = httpx.get(summary, headers=wrong)
    assert r.status_code == 429 and "failed authentication" in r.json()["error"]["message"]


def test_a_wrong_key_is_refused_by_its_own_budget_before_authentication(
    service: ServiceProcess,
) -> None:
    service.env.update(
        {"METRICS_ANALYTICS_RATE_LIMIT": "2/minute", "METRICS_AUTH_FAILURE_LIMIT": "10"}
    )
    service.start()
    summary = service.url + "/analytics/summary"
    wrong = {"X-API-Key": "mcpm_" + "Z" * 43}
    codes = [httpx.get(summary, headers=wrong).status_code for _ in range(4)]
    assert codes == [401, 401, 429, 429]
    # The refused ones never reached authentication: the address has spent 2 of its 10 failures.
    assert [httpx.get(summary).status_code for _ in range(8)] == [401] * 8
    assert httpx.get(summary).status_code == 429


def test_admin_budget_is_shared_by_admin_routes_rate_limit_and_flush_apart_from_analytics(
    service: ServiceProcess,
) -> None:
    service.env["METRICS_ROUTE_RATE_LIMIT"] = "6/minute"
    service.start()
    paths = ["/admin/keys", "/admin/db/stats", "/rate-limit", "/admin/retention/policies"]
    responses = burst(service.url, [(paths[i % 4], ADMIN) for i in range(20)])
    assert statuses(responses) == {200: 6, 429: 14}
    refused = next(r for r in responses if r.status_code == 429)
    assert_route_429(refused, "X-API-Key", "METRICS_ROUTE_RATE_LIMIT", 6)
    flushed = httpx.post(service.url + "/flush", headers=ADMIN)
    assert flushed.status_code == 429
    # The analytics budget of the same key is apart; ingest keys have their own.
    assert httpx.get(service.url + "/analytics/summary", headers=ADMIN).status_code == 200
    ingest = {"X-API-Key": INGEST_KEY}
    assert httpx.post(service.url + "/flush", headers=ingest).status_code == 200
    # A refused admin request did nothing: no key was created by the refused POST.
    before = db_rows(service.db_path, "SELECT count(*) FROM api_keys")
    r = httpx.post(service.url + "/admin/keys", json={"role": "viewer"}, headers=ADMIN)
    assert r.status_code == 429
    assert db_rows(service.db_path, "SELECT count(*) FROM api_keys") == before


def test_address_budget_covers_every_regular_route_by_the_trusted_proxy_address(
    service: ServiceProcess,
) -> None:
    service.env.update(
        {
            "METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS": "10/minute",
            "METRICS_TRUSTED_PROXIES": "127.0.0.1",
        }
    )
    service.start()
    client = {"X-Forwarded-For": "198.51.100.7"}
    paths = ["/ui", "/ui/app.js", "/", "/docs", "/ui/app.css"]
    responses = burst(service.url, [(paths[i % 5], client) for i in range(25)])
    assert statuses(responses) == {200: 10, 429: 15}
    refused = next(r for r in responses if r.status_code == 429)
    assert_route_429(refused, "client_address", "METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS", 10)
    # A key does not lift the address budget: an analytics request with a good key is refused.
    keyed = {**client, **ADMIN}
    assert httpx.get(service.url + "/analytics/summary", headers=keyed).status_code == 429
    # The probes are never limited, and the ingest path is not a regular route.
    for probe in ("/health", "/ready"):
        assert httpx.get(service.url + probe, headers=client).status_code == 200
    ingest = {**client, "X-API-Key": INGEST_KEY}
    assert httpx.post(service.url + "/metrics", json=payload(), headers=ingest).status_code == 200
    # Another forwarded client has its own budget; from a peer that is not a trusted proxy the
    # header is ignored and the peer is the client.
    other = {"X-Forwarded-For": "198.51.100.8"}
    assert httpx.get(service.url + "/ui", headers=other).status_code == 200
    spoofed = burst(service.url, [("/ui", client)] * 3, local_address="127.0.0.2")
    assert statuses(spoofed) == {200: 3}


def test_retry_after_counts_from_the_oldest_request_in_the_window(
    service: ServiceProcess,
) -> None:
    service.env["METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS"] = "3/minute"
    service.start()
    started = time.time()
    assert httpx.get(service.url + "/ui").status_code == 200
    first_done = time.time()  # the first request was counted between started and now
    # The clock has to move on (by more than a second, so that "60 s from now" would be wrong).
    time.sleep(2.2)
    assert [httpx.get(service.url + "/").status_code for _ in range(3)] == [200, 200, 429]
    sent = time.time()
    r = httpx.get(service.url + "/ui")
    assert r.status_code == 429
    # The first request leaves the moving window 60 s after it was counted: about 58 s from now.
    assert 55 <= int(r.headers["retry-after"]) <= math.ceil(first_done + 60 - sent)
    assert started + 60 <= int(r.headers["x-ratelimit-reset"]) <= math.ceil(first_done + 60)


def test_an_unreachable_limit_store_lets_requests_through_and_says_so_once(
    service: ServiceProcess,
) -> None:
    service.env.update(
        {
            "METRICS_RATE_LIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}/0",
            "METRICS_ANALYTICS_RATE_LIMIT": "2/minute",
        }
    )
    service.start()
    codes = [
        httpx.get(service.url + "/analytics/summary", headers=ADMIN).status_code for _ in range(6)
    ]
    assert codes == [200] * 6  # fail open, as on the ingest path
    assert service.log().count("Failed to rate limit") == 1


@pytest.mark.parametrize(
    "variable",
    [
        "METRICS_ANALYTICS_RATE_LIMIT",
        "METRICS_ROUTE_RATE_LIMIT",
        "METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS",
    ],
)
@pytest.mark.parametrize("value", ["lots", "0/minute", "", "12/fortnight"])
def test_a_bad_route_limit_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_route_limits_accept_the_limits_notation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("METRICS_ROUTE_RATE_LIMIT", "10/second;500 per hour")
    assert load_settings(db_path=tmp_path / "m.db").route_rate_limit == "10/second;500 per hour"


def test_the_limit_check_bench_measures_every_check_on_every_storage(
    redis_server: RedisServer,
) -> None:
    """bench/route_limits.py end to end on a tiny load (no timing asserted)."""
    stdout = run_bench(
        "route_limits.py",
        "--checks",
        "60",
        "--redis-url",
        redis_server.url,
    )
    rows = [line.split() for line in stdout.splitlines() if "limit" in line and "µs" not in line]
    storages = Counter(row[0] for row in rows if row[0] != "storage")
    assert storages == {"memory": 3, "redis": 3, "redis+proxy": 3}, stdout
    assert re.search(r"redis\+proxy: PING round trip \d+\.\d+ ms", stdout), stdout
    # Every row ends with its two figures, both positive.
    assert all(float(row[-1]) > 0 and float(row[-2]) > 0 for row in rows if row[0] != "storage")
