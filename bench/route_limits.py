"""What a limit check costs: the ingest path's own sliding window (metrics_service/ratelimit.py)
next to the regular routes' slowapi guard (synchronous storage), on memory and on a real
redis-server.

    .venv/bin/python bench/route_limits.py [--checks 20000] [--concurrency 16] [--rtt-ms 1]
                                           [--redis-url URL]

Without ``--redis-url`` a redis-server is started on a free loopback port (and stopped) if the
binary is installed. Storages: memory, that Redis, and the same Redis behind a proxy that adds
``--rtt-ms`` of round trip (bench/_delay_proxy.py: a Redis on another host). For each it reports

- µs per check, one at a time: ``RateLimiter.hit`` (one atomic take from the window, what
  ``POST /metrics`` does) and the slowapi guard of a route class, with one limit (``page``: the
  address) and with two (``analytics``: the key, then the address);
- checks per second with ``--concurrency`` checks in flight on one event loop: the asyncio
  storage overlaps its Redis round trips on the loop, slowapi's runs in a worker thread on Redis;
- for each Redis, the median PING round trip as measured (the proxy's real delay, which on a
  loaded machine is more than ``--rtt-ms``).

Each check is for a key of its own (a few hits per window, as under real budgets), and budgets
are large enough that none is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _workload import free_port
from starlette.requests import Request

from metrics_service import auth
from metrics_service.ratelimit import RateLimiter
from metrics_service.route_limits import RouteLimits
from metrics_service.settings import Settings

BIG = "100000000/minute"


def _start_redis() -> tuple[str, subprocess.Popen[bytes]] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0", proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def _request(app: Any, path: str, key: str) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8890),
        "scheme": "http",
        "root_path": "",
        "app": app,
        "state": {},
    }
    return Request(scope)


async def _per_check_us(check: Callable[[int], Awaitable[None]], n: int) -> float:
    for i in range(min(n, 500)):  # warm up: connections, scripts, caches
        await check(i)
    t = time.perf_counter()
    for i in range(n):
        await check(i)
    return (time.perf_counter() - t) / n * 1e6


async def _concurrent_per_s(check: Callable[[int], Awaitable[None]], n: int, c: int) -> float:
    async def worker(offset: int) -> None:
        for i in range(offset, n, c):
            await check(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(c)))
    return n / (time.perf_counter() - t)


async def _measure(uri: str, n: int, concurrency: int) -> dict[str, tuple[float, float]]:
    settings = Settings(
        db_path=Path(tempfile.mkdtemp()) / "m.db",
        rate_limit_storage_uri=uri,
        analytics_rate_limit=BIG,
        route_rate_limit=BIG,
        route_rate_limit_per_address=BIG,
        otel_prometheus_port=0,
    )
    limiter = RateLimiter(settings.rate_limit_storage_uri)
    routes = RouteLimits(settings)
    metrics = SimpleNamespace(authenticator=auth.Authenticator(auth.KeyTable(), limiter, settings))
    app = SimpleNamespace(state=SimpleNamespace(metrics=metrics, route_limits=routes))

    async def ingest(i: int) -> None:
        decision = await limiter.hit("key", str(i), 100_000_000)
        assert decision.allowed

    def guard(path: str) -> Callable[[int], Awaitable[None]]:
        async def check(i: int) -> None:
            await routes.check(_request(app, path, f"bench-key-{i:08d}-0123456789"))

        return check

    checks = {
        "own limit, 1 s buckets (ingest)": ingest,
        "slowapi, 1 limit (page)": guard("/ui"),
        "slowapi, 2 limits (analytics)": guard("/analytics/summary"),
    }
    out = {}
    for name, check in checks.items():
        per_us = await _per_check_us(check, n)
        per_s = await _concurrent_per_s(check, n, concurrency)
        out[name] = (per_us, per_s)
    return out


def _ping_ms(url: str, n: int = 200) -> float:
    """The median round trip of a Redis PING at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.ping()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - t)
    finally:
        client.close()
    return sorted(times)[n // 2] * 1000


def _start_delay(redis_url: str, rtt_ms: float) -> tuple[str, subprocess.Popen[bytes]]:
    target = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    port = free_port()
    script = str(Path(__file__).with_name("_delay_proxy.py"))
    proxy = subprocess.Popen(
        [sys.executable, script, str(port), str(target), str(rtt_ms)],
        stdout=subprocess.PIPE,
    )
    assert proxy.stdout is not None
    if proxy.stdout.readline().strip() != b"ready":
        raise SystemExit("the delay proxy did not start")
    return f"redis://127.0.0.1:{port}/0", proxy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    # asyncio sleeps in whole milliseconds: the proxy's real round trip is longer (measured).
    parser.add_argument("--rtt-ms", type=float, default=1.0)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    processes: list[subprocess.Popen[bytes]] = []
    uris = [("memory", "memory://")]
    redis_url = args.redis_url
    if redis_url is None:
        started = _start_redis()
        if started is not None:
            redis_url = started[0]
            processes.append(started[1])
        else:
            print("redis-server not installed: memory only (apt-get install -y redis-server)")
    try:
        if redis_url is not None:
            uris.append(("redis", redis_url))
            if args.rtt_ms > 0:
                delayed, proxy = _start_delay(redis_url, args.rtt_ms)
                processes.append(proxy)
                uris.append(("redis+proxy", delayed))
        in_flight = f"checks/s c{args.concurrency}"
        print(f"{'storage':<12} {'check':<32} {'us/check':>9} {in_flight:>14}")
        for label, uri in uris:
            if uri.startswith("redis"):
                print(f"{label}: PING round trip {_ping_ms(uri):.2f} ms (median)")
            results = asyncio.run(_measure(uri, args.checks, args.concurrency))
            for name, (per_us, per_s) in results.items():
                print(f"{label:<12} {name:<32} {per_us:>9.1f} {per_s:>14.0f}")
    finally:
        for proc in reversed(processes):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
