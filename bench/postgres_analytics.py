"""Analytics over a long history on PostgreSQL: the views of bench/analytics.py, timed the same.

    .venv/bin/python bench/postgres_analytics.py                          # 10 million, 30 days
    .venv/bin/python bench/postgres_analytics.py --events 200000 --days 3 # quick
    .venv/bin/python bench/postgres_analytics.py --url postgresql://... [--reuse]

The history (bench/analytics.py's generator: Zipf-distributed tools, clients and tenants) is
loaded in bulk, one day at a time in time order: ``COPY`` of the day's raw rows and the day's
hour rollups, aggregated by the shared rollup logic (``storage/rollups.py``) and upserted as the
service's commits upsert them, one transaction per day (``add_raw``). The rollups are the ones
ingest builds (``tests/test_postgres_rollups.py`` checks them against the raw rows); the service's
own path (``Backend.insert_batches``, commits of 10,000) builds about 16,000 events/s here, too
slow for 10 million. Complete days are then compacted and the tables analysed. The database is a
fresh cluster started by tests/_servers.py (server defaults, fsync on) unless ``--url`` names one
(``--reuse``: time the views of a history built before). Each view is answered over the whole
range ``--repeat`` times through ``Backend.analytics`` (one read-only snapshot per view, as the
service answers it): median and worst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analytics import CASES, History  # noqa: E402
from metrics_service.analytics import queries  # noqa: E402
from metrics_service.storage import rollups  # noqa: E402
from metrics_service.storage.postgres import Backend  # noqa: E402
from metrics_service.storage.postgres import rollups as pg_rollups  # noqa: E402
from metrics_service.storage.postgres._conn import Conn  # noqa: E402
from metrics_service.storage.postgres.migrations import TABLE_OF_TYPE, row_columns  # noqa: E402
from tests._servers import start_postgres  # noqa: E402

DAY_MS = rollups.DAY_MS
#: Events generated at a time (rows of one ``History.rows`` call).
CHUNK_EVENTS = 50_000


async def add_raw(
    backend: Backend, conn: Conn, parts: Sequence[dict[str, list[tuple[Any, ...]]]]
) -> int:
    """Store ``parts`` (rows in the layout ``validation`` builds) in bulk: ``COPY`` of each
    family's raw rows in one transaction (holding the insert lock, as the service's commits
    do), then the service's own fold of all of them at once (``Backend.fold``: one statement
    per raw table, one upsert per bucket and key). Returns the rows stored."""
    wanted = {
        (TABLE_OF_TYPE[kind], r[0] - r[0] % DAY_MS)
        for part in parts
        for kind, rows in part.items()
        for r in rows
    }
    await backend.partitions.ensure(conn, wanted)
    kinds = sorted({kind for part in parts for kind in part})
    count = 0
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock_shared({pg_rollups.WATERMARK_LOCK})")
        for kind in kinds:
            rows = [r for part in parts for r in part.get(kind, ())]
            if rows:
                await conn.copy_records_to_table(
                    TABLE_OF_TYPE[kind], records=rows, columns=row_columns(kind)
                )
            count += len(rows)
    await backend.fold()
    return count


async def build(backend: Backend, events: int, days: int) -> dict[str, float]:
    """``events`` over the ``days`` before now, loaded one day at a time by ``add_raw``."""
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - days * DAY_MS
    # As a service that has run all along: days are compacted after the fact, not as late events.
    await backend.execute("UPDATE rollup_watermark SET until_ms = $1", start_ms // DAY_MS * DAY_MS)
    history = History()
    started = time.perf_counter()
    span = now_ms - start_ms
    step = max(1, span * CHUNK_EVENTS // events)
    t, done = start_ms, 0
    async with backend._conn("bulk load") as conn:
        while t < now_ms:
            day_end = min(now_ms, (t // DAY_MS + 1) * DAY_MS)
            parts = []
            while t < day_end:
                end = min(day_end, t + step)
                n = events * (end - start_ms) // span - done  # evenly over time
                if n:
                    parts.append(history.rows(t, end, n))
                t, done = end, done + n
            if parts:
                await add_raw(backend, conn, parts)
            print(f"  {done:,} events", file=sys.stderr, flush=True)
    insert_s = time.perf_counter() - started
    started = time.perf_counter()
    await backend.compact_rollups(now_ms)
    compact_s = time.perf_counter() - started
    await backend.execute("ANALYZE")
    size = (await backend.database_size())["total_bytes"]
    return {"insert_s": insert_s, "compact_s": compact_s, "bytes": size}


async def time_views(backend: Backend, days: int, repeat: int) -> list[dict[str, Any]]:
    results = []
    for view, extra in CASES:
        query = {"since": f"{days}d", **extra}
        times = []
        body: dict[str, Any] = {}
        for _ in range(repeat):
            started = time.perf_counter()
            body = await backend.analytics(
                lambda reader, v=view, q=query: queries.run(reader, v, q)  # type: ignore[misc]
            )
            times.append(time.perf_counter() - started)
        results.append(
            {
                "case": f"/analytics/{view}"
                + ("?" + "&".join(f"{k}={v}" for k, v in extra.items()) if extra else ""),
                "median_ms": statistics.median(times) * 1000,
                "max_ms": max(times) * 1000,
                "source": body.get("source"),
            }
        )
    return results


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    backend = Backend(None, url, command_timeout_s=600)
    await backend.open()
    try:
        report: dict[str, Any] = {"events": args.events, "days": args.days}
        if not args.reuse:
            built = report["build"] = await build(backend, args.events, args.days)
            print(
                f"built {args.events:,} events over {args.days} days in {built['insert_s']:.0f} s"
                f" ({args.events / built['insert_s']:,.0f} events/s), compacted in"
                f" {built['compact_s']:.1f} s, {built['bytes'] / 2**20:,.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
        report["views"] = await time_views(backend, args.days, args.repeat)
        return report
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", help="an empty PostgreSQL database instead of a fresh cluster")
    parser.add_argument("--reuse", action="store_true", help="time the views of --url's history")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.reuse and not args.url:
        parser.error("--reuse needs --url")
    if args.url:
        report = asyncio.run(run(args.url, args))
    else:
        server = start_postgres({"fsync": "on", "shared_buffers": "256MB", "work_mem": "32MB"})
        try:
            report = asyncio.run(run(server.url(), args))
        finally:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"\n| view, {args.days} days over {args.events:,} events | median ms | max ms | source |"
        "\n|---|---|---|---|"
    )
    for v in report["views"]:
        print(f"| `{v['case']}` | {v['median_ms']:.0f} | {v['max_ms']:.0f} | {v['source']} |")


if __name__ == "__main__":
    main()
