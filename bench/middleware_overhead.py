"""Overhead of the client middleware on the host's hot path.

    python bench/middleware_overhead.py [--events N] [--requests N] [--repeat R]

Measures, in microseconds per operation (best of R runs, as timeit does; queues are emptied and
the garbage collector run between runs, so that a growing heap does not count against later runs):
  * one `record*()` call (queue append; the sender is not running, so nothing else competes),
    and the same with the on-disk spool (JSON encoding and one write(2) per event),
  * one HTTP request through `AuthMetricsMiddleware` minus the same request without it, for an
    auth route (recorded) and another route (passed through), calling the ASGI app directly,
  * one tools/call through the mcp 2.x server middleware, minus `call_next` alone.
Network I/O happens on the background sender and is not on these paths.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from mcp_metrics import (
    AuthMetricsMiddleware,
    MetricsClient,
    ThreadedMetricsClient,
    report_auth_outcome,
)

URL = "http://127.0.0.1:9"  # never contacted: the sender is not started


CLIENTS: list[Any] = []


def make_client(cls: type = MetricsClient, **kw: Any) -> Any:
    client = cls(url=URL, api_key="k" * 40, service="bench", max_queue_size=10_000_000, **kw)
    CLIENTS.append(client)
    return client


def reset() -> None:
    for client in CLIENTS:
        client._queue.clear()
    gc.collect()


def per_call_us(fn: Callable[[], None], n: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        reset()
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - start) / n / 1000)
    return min(runs)


def bench_record(n: int, repeat: int) -> dict[str, float]:
    client = make_client()
    threaded = make_client(ThreadedMetricsClient, register_atexit=False)
    threaded._thread = object()  # keep the sender thread off: measure the recording path only
    spool_dir = tempfile.mkdtemp(prefix="mcp-metrics-bench-spool-")
    spooled = make_client(
        ThreadedMetricsClient,
        register_atexit=False,
        spool_path=spool_dir,
        spool_max_bytes=8 * 1024 * 1024 * 1024,
    )
    spooled._thread = object()
    results = {
        "record (custom, 1 dim)": per_call_us(
            lambda: client.record_custom("x", region="eu"), n, repeat
        ),
        "record_tool_execution (9 dims + metadata)": per_call_us(
            lambda: client.record_tool_execution(
                tool_name="search",
                success=True,
                duration_ms=1.5,
                server_name="srv",
                client_name="claude",
                client_version="1.0",
                input_size_bytes=120,
                output_size_bytes=800,
                transport="stdio",
                metadata={"agent_id": "a-1", "input_tokens": 10},
            ),
            n,
            repeat,
        ),
        "ThreadedMetricsClient.record_auth": per_call_us(
            lambda: threaded.record_auth(success=True, method="jwt", server="s", duration_ms=2.0),
            n,
            repeat,
        ),
        "ThreadedMetricsClient.record_tool_execution with a spool": per_call_us(
            lambda: spooled.record_tool_execution(
                tool_name="search",
                success=True,
                duration_ms=1.5,
                server_name="srv",
                client_name="claude",
                client_version="1.0",
                input_size_bytes=120,
                output_size_bytes=800,
                transport="stdio",
                metadata={"agent_id": "a-1", "input_tokens": 10},
            ),
            n,
            repeat,
        ),
        "record when reporting is off": per_call_us(
            lambda: MetricsClient.record_custom(disabled, "x"), n, repeat
        ),
    }
    spooled._closed = True  # the sender never ran: nothing to flush
    spooled._drop_remaining()  # closes the spool (its events stay on disk) ...
    shutil.rmtree(spool_dir)  # ... which goes away with its directory
    return results


disabled = MetricsClient(url=None, api_key=None, service="bench", enabled=False)


async def _endpoint(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"] == "/validate":
        report_auth_outcome(scope, user_id="alice")
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def bench_asgi(n: int, repeat: int) -> dict[str, float]:
    client = make_client()
    wrapped = AuthMetricsMiddleware(
        _endpoint, client=client, auth_routes=["/validate", "/oauth/{provider}/callback"]
    )

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    def scope(path: str) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "GET",
            "path": path,
            "root_path": "",
            "headers": [(b"authorization", b"Bearer aaa.bbb.ccc"), (b"host", b"x")],
            "state": {},
        }

    async def run(app: Any, path: str) -> float:
        runs = []
        for _ in range(repeat):
            reset()
            start = time.perf_counter_ns()
            for _ in range(n):
                await app(scope(path), receive, send)
            runs.append((time.perf_counter_ns() - start) / n / 1000)
        return min(runs)

    async def main() -> dict[str, float]:
        base = await run(_endpoint, "/validate")
        auth = await run(wrapped, "/validate")
        param = await run(wrapped, "/oauth/github/callback")
        other_base = await run(_endpoint, "/health")
        other = await run(wrapped, "/health")
        return {
            "ASGI auth route, recorded (overhead)": auth - base,
            "ASGI templated auth route, recorded (overhead)": param - base,
            "ASGI other route, passed through (overhead)": other - other_base,
            "ASGI bare app, for reference": base,
        }

    return asyncio.run(main())


def bench_mcp(n: int, repeat: int) -> dict[str, float]:
    try:
        from mcp_metrics.mcp.recording import Instrumentation
        from mcp_metrics.mcp.v2 import MetricsServerMiddleware
    except ImportError:
        return {}
    client = make_client()
    middleware = MetricsServerMiddleware(Instrumentation(client, server_name="srv"))
    result = {"content": [{"type": "text", "text": "3"}], "isError": False}

    async def call_next(ctx: Any) -> Any:
        return result

    info = SimpleNamespace(name="bench-client", version="1.0")
    connection = SimpleNamespace(session_id="s-1", outbound=object())
    ctx = SimpleNamespace(
        method="tools/call",
        params={"name": "add", "arguments": {"a": 1, "b": 2}},
        request_id=1,
        request=None,
        session=SimpleNamespace(
            _connection=connection, client_params=SimpleNamespace(client_info=info)
        ),
    )

    async def run(fn: Callable[[], Any]) -> float:
        runs = []
        for _ in range(repeat):
            reset()
            start = time.perf_counter_ns()
            for _ in range(n):
                await fn()
            runs.append((time.perf_counter_ns() - start) / n / 1000)
        return min(runs)

    async def main() -> dict[str, float]:
        base = await run(lambda: call_next(ctx))
        with_mw = await run(lambda: middleware(ctx, call_next))
        return {"MCP tools/call through the 2.x middleware (overhead)": with_mw - base}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = {
        **bench_record(args.events, args.repeat),
        **bench_asgi(args.requests, args.repeat),
        **bench_mcp(args.requests, args.repeat),
    }
    width = max(len(k) for k in rows)
    print(f"{'path':<{width}}  µs/op")
    for name, us in rows.items():
        print(f"{name:<{width}}  {us:6.2f}")


if __name__ == "__main__":
    main()
