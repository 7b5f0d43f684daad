"""Storage ingest on PostgreSQL beside SQLite, in one run, through the same group-commit driver.

    .venv/bin/python bench/postgres_ingest.py                    # batch 100 and 1, c16, 10 s each
    .venv/bin/python bench/postgres_ingest.py --batch 100 --duration 20 --runs 3
    .venv/bin/python bench/postgres_ingest.py --batch 1 --idempotency  # keyed, as the middleware
    .venv/bin/python bench/postgres_ingest.py --batch 100 --query-every 0.2  # analytics meanwhile

What runs: ``--concurrency`` producers each submit one request's validated rows (``--batch``
metrics of the bench mix, bench/_workload.py, validated by the service's ``Validator``) and wait
for its commit, then submit the next, as the service's request handlers do in durable mode; one
writer takes everything queued (up to 10,000 rows, the service's ``METRICS_COMMIT_MAX_ROWS``) and
commits it in one transaction, as ``metrics_service/ingest.py`` does. SQLite: ``insert_rows`` on
a fresh file (WAL, synchronous=FULL) on a thread, as the service's writer thread, rollups folded
in every 0.5 s as there. PostgreSQL:
``Backend.insert_batches`` (the ingest function or COPY, one transaction; rollups folded in every
0.5 s by the backend's own task, as in the service) on a fresh cluster started by
tests/_servers.py with the server defaults (fsync and synchronous_commit on).

Reported per backend and batch size: metrics/s committed (acknowledged), and the CPU per metric
in this process (the storage layer as the service runs it: validation excluded, rows are built
before the clock starts) and, for PostgreSQL, in the server's processes (postmaster and
backends, from /proc), in microseconds. Rows are counted afterwards and must equal the metrics
acknowledged.

``--query-every S``: meanwhile, one analytics query (tool calls by tool over the last day, the
rollups and the raw rows not folded yet, as the service's views read them) every S seconds
through the backend's reader, its latency reported as p50 and p99; then the same query 20 times
once ingest has stopped and everything is folded ("idle"), for what exactness under ingest
costs a query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import bodies  # noqa: E402

from metrics_service import Settings, storage  # noqa: E402
from metrics_service.idempotency import Claim  # noqa: E402
from metrics_service.storage.postgres import Backend  # noqa: E402
from metrics_service.storage.rollups import DAY_MS, HOUR_MS, Query  # noqa: E402
from metrics_service.storage.sqlite import rollups as sqlite_rollups  # noqa: E402
from metrics_service.storage.sqlite.database import Deferred  # noqa: E402
from metrics_service.validation import Validator  # noqa: E402
from tests._servers import PostgresServer, start_postgres  # noqa: E402

Part = dict[str, list[tuple[Any, ...]]]
MAX_ROWS = 10_000
_TICK = os.sysconf("SC_CLK_TCK")
Probe = Callable[[], Awaitable[Any]]


def probe_query() -> Query:
    now_ms = int(time.time() * 1000)
    return Query("tool_execution", now_ms - DAY_MS, now_ms + HOUR_MS, group=("tool_name",))


async def probing(probe: Probe, every_s: float, stop: asyncio.Event) -> list[float]:
    """Run ``probe`` every ``every_s`` until ``stop``; its latencies in ms."""
    out = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await probe()
        out.append((time.perf_counter() - t0) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return out


async def idle_ms(probe: Probe, n: int = 20) -> float:
    """The median latency of ``probe`` with nothing else running."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await probe()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def _latencies(under: list[float], idle: float) -> dict[str, float]:
    if not under:
        return {}
    under = sorted(under)
    return {
        "query_p50_ms": statistics.median(under),
        "query_p99_ms": under[min(len(under) - 1, int(len(under) * 0.99))],
        "query_idle_ms": idle,
    }


def parts_for(batch: int, n: int) -> list[Part]:
    validator = Validator(Settings())
    out = []
    for body in bodies(n, batch):
        decoded = validator.decode(body)
        assert not decoded.rejections
        out.append(decoded.rows)
    return out


def server_cpu_s(server: PostgresServer) -> float:
    """CPU seconds of the postmaster and every process it forked (its backends), so far."""
    total = 0
    pids = [server.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == server.pid:
                pids.append(int(entry.name))
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _claim(n: int) -> Claim:
    """A fresh ``Idempotency-Key`` for one request, as the middleware sends with every POST."""
    return Claim("bench", f"key-{n}", "f" * 64, 200, b'{"accepted": 1}', 86_400.0)


async def drive(
    commit: Callable[[list[Part], list[Claim | None]], Awaitable[Any]],
    parts: list[Part],
    concurrency: int,
    duration_s: float,
    writers: int = 1,
    idempotency: bool = False,
    probe: tuple[Probe, float] | None = None,
) -> tuple[int, list[float]]:
    """Producers submit parts (each with an idempotency claim if ``idempotency``) and await
    their commit; ``writers`` writers (the service has one) group-commit the queue; ``probe``
    (a query, seconds between) runs meanwhile. Returns the metrics acknowledged and the
    probe's latencies."""
    queue: asyncio.Queue[tuple[Part, Claim | None, asyncio.Future[None]]] = asyncio.Queue()
    keys = itertools.count()
    stop = time.monotonic() + duration_s
    acked = 0
    per_part = sum(len(rows) for rows in parts[0].values())

    async def producer(offset: int) -> None:
        nonlocal acked
        i = offset
        loop = asyncio.get_running_loop()
        while time.monotonic() < stop:
            done: asyncio.Future[None] = loop.create_future()
            claim = _claim(next(keys)) if idempotency else None
            await queue.put((parts[i % len(parts)], claim, done))
            await done
            acked += per_part
            i += concurrency

    async def writer() -> None:
        while True:
            first = await queue.get()
            group = [first]
            rows = per_part
            while not queue.empty() and rows < MAX_ROWS:
                group.append(queue.get_nowait())
                rows += per_part
            claims = [c for _, c, _ in group]
            await commit([p for p, _, _ in group], claims if idempotency else [])
            for _, _, done in group:
                done.set_result(None)

    tasks = [asyncio.create_task(writer()) for _ in range(writers)]
    stopped = asyncio.Event()
    probes = asyncio.create_task(probing(*probe, stopped)) if probe else None
    await asyncio.gather(*(producer(i) for i in range(concurrency)))
    stopped.set()
    latencies = await probes if probes else []
    for task in tasks:
        task.cancel()
    return acked, latencies


def bench_sqlite(
    parts: list[Part],
    concurrency: int,
    duration_s: float,
    idempotency: bool = False,
    query_every: float = 0.0,
) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="bench-sqlite-"))
    try:
        conn, _ = storage.open_database(folder / "m.db", check_same_thread=False)
        # As the service's writer: rollups folded in every METRICS_ROLLUP_FOLD_INTERVAL_S.
        deferred = Deferred()

        async def commit(group: list[Part], claims: list[Claim | None]) -> None:
            await asyncio.to_thread(storage.insert_rows, conn, group, claims, deferred)

        # As the service's reader: its own connection, on a thread of its own.
        reader, _ = storage.open_database(folder / "m.db", check_same_thread=False)
        q = probe_query()

        async def probe() -> Any:
            return await asyncio.to_thread(sqlite_rollups.aggregate, reader, q)

        async def go() -> tuple[int, list[float], float]:
            acked, under = await drive(
                commit,
                parts,
                concurrency,
                duration_s,
                1,
                idempotency,
                (probe, query_every) if query_every else None,
            )
            cpu = time.process_time() - cpu0
            await asyncio.to_thread(deferred.catch_up, conn)
            return acked, under, cpu

        cpu0, t0 = time.process_time(), time.monotonic()
        acked, under, cpu = asyncio.run(go())
        wall = time.monotonic() - t0
        idle = asyncio.run(idle_ms(probe)) if query_every else 0.0
        rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in storage.TABLES)
        conn.close()
        reader.close()
        assert rows == acked, (rows, acked)
        return {
            "metrics_s": acked / wall,
            "service_us": cpu / acked * 1e6,
            "server_us": 0.0,
            **_latencies(under, idle),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_postgres(
    server: PostgresServer,
    parts: list[Part],
    concurrency: int,
    duration_s: float,
    run: int,
    writers: int = 1,
    idempotency: bool = False,
    query_every: float = 0.0,
) -> dict[str, float]:
    database = f"bench_{run}_{int(time.time())}"
    server.psql(f"CREATE DATABASE {database}", database="postgres")

    async def go() -> tuple[int, float, float, float, dict[str, float]]:
        # As the service's: rollups folded in every METRICS_ROLLUP_FOLD_INTERVAL_S (0.5 s).
        backend = Backend(Settings(), server.url(database))
        await backend.open()
        q = probe_query()

        async def probe() -> Any:
            return await backend.analytics(lambda reader: reader.aggregate(q))

        try:
            cpu0, s0, t0 = time.process_time(), server_cpu_s(server), time.monotonic()
            acked, under = await drive(
                backend.insert_batches,
                parts,
                concurrency,
                duration_s,
                writers,
                idempotency,
                (probe, query_every) if query_every else None,
            )
            cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
            scpu = server_cpu_s(server) - s0
            rows = 0
            for t in storage.TABLES:
                rows += (await backend.execute(f"SELECT count(*) FROM {t}"))[0][0]
            assert rows == acked, (rows, acked)
            latencies: dict[str, float] = {}
            if query_every:
                await backend.fold(wait=True)
                latencies = _latencies(under, await idle_ms(probe))
            return acked, cpu, wall, scpu, latencies
        finally:
            await backend.close()

    acked, cpu, wall, scpu, latencies = asyncio.run(go())
    server.psql(f"DROP DATABASE {database}", database="postgres")
    return {
        "metrics_s": acked / wall,
        "service_us": cpu / acked * 1e6,
        "server_us": scpu / acked * 1e6,
        **latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--pg-writers",
        type=int,
        default=1,
        help="also run PostgreSQL with this many concurrent writers (as that many replicas)",
    )
    parser.add_argument(
        "--query-every",
        type=float,
        default=0.0,
        help="meanwhile, one analytics query every this many seconds (latency reported)",
    )
    parser.add_argument(
        "--idempotency",
        action="store_true",
        help="every request carries an Idempotency-Key (claimed in its commit), as the"
        " middleware's do",
    )
    args = parser.parse_args()
    batches = args.batch or [100, 1]
    server = start_postgres({"fsync": "on"})
    results: list[dict[str, Any]] = []
    try:
        for batch in batches:
            parts = parts_for(batch, max(64, 2000 // batch))
            setups = [("sqlite", 1), ("postgresql", 1)]
            if args.pg_writers > 1:
                setups.append(("postgresql", args.pg_writers))
            for backend, writers in setups:
                runs = []
                for run in range(args.runs):
                    if backend == "sqlite":
                        runs.append(
                            bench_sqlite(
                                parts,
                                args.concurrency,
                                args.duration,
                                args.idempotency,
                                args.query_every,
                            )
                        )
                    else:
                        runs.append(
                            bench_postgres(
                                server,
                                parts,
                                args.concurrency,
                                args.duration,
                                run,
                                writers,
                                args.idempotency,
                                args.query_every,
                            )
                        )
                row = {
                    "backend": backend,
                    "writers": writers,
                    "batch": batch,
                    "concurrency": args.concurrency,
                    "idempotency": args.idempotency,
                    **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                }
                results.append(row)
                print(
                    f"{backend:>10} x{writers}  batch {batch:>3}  c{args.concurrency}"
                    f"{'  idempotency' if args.idempotency else ''}"
                    f"  {row['metrics_s']:>9.0f} metrics/s"
                    f"  service {row['service_us']:6.1f} us/metric"
                    f"  postgres {row['server_us']:6.1f} us/metric"
                    + (
                        f"  query p50 {row['query_p50_ms']:.1f} p99 {row['query_p99_ms']:.1f}"
                        f" idle {row['query_idle_ms']:.1f} ms"
                        if "query_p50_ms" in row
                        else ""
                    ),
                    flush=True,
                )
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
