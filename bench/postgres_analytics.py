"""Analytics over a long history on PostgreSQL: the views of bench/analytics.py, timed the same.

    .venv/bin/python bench/postgres_analytics.py                          # 10 million, 30 days
    .venv/bin/python bench/postgres_analytics.py --events 200000 --days 3 # quick

The history (bench/analytics.py's generator: Zipf-distributed tools, clients and tenants) is
written through ``Backend.insert_batches`` in time order, in commits of 10,000 (COPY, rollup
upserts, one transaction each, as the service's group commit under load), into a fresh cluster
started by tests/_servers.py (server defaults, fsync on); complete days are then compacted and
the tables analysed. Each view is then answered over the whole range ``--repeat`` times through
``Backend.analytics`` (one read-only snapshot per view, as the service answers it): median and
worst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analytics import CASES, History  # noqa: E402
from metrics_service.analytics import queries  # noqa: E402
from metrics_service.storage import rollups  # noqa: E402
from metrics_service.storage.postgres import Backend  # noqa: E402
from tests._servers import start_postgres  # noqa: E402


async def build(backend: Backend, events: int, days: int, commit_rows: int) -> dict[str, float]:
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - days * rollups.DAY_MS
    await backend.execute(
        "UPDATE rollup_watermark SET until_ms = $1", start_ms // rollups.DAY_MS * rollups.DAY_MS
    )
    history = History()
    started = time.perf_counter()
    step = (now_ms - start_ms) * commit_rows // events
    t, done = start_ms, 0
    while done < events:
        n = min(commit_rows, events - done)
        await backend.insert_batches([history.rows(t, min(now_ms, t + step), n)])
        t += step
        done += n
        if done % 1_000_000 < commit_rows:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--commit-rows", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = start_postgres({"fsync": "on", "shared_buffers": "256MB", "work_mem": "32MB"})

    async def go() -> dict[str, Any]:
        backend = Backend(None, server.url())
        await backend.open()
        try:
            built = await build(backend, args.events, args.days, args.commit_rows)
            print(
                f"built {args.events:,} events over {args.days} days in {built['insert_s']:.0f} s"
                f" ({args.events / built['insert_s']:,.0f} events/s), compacted in"
                f" {built['compact_s']:.1f} s, {built['bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
            views = await time_views(backend, args.days, args.repeat)
            return {"build": built, "views": views}
        finally:
            await backend.close()

    try:
        result = asyncio.run(go())
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    for row in result["views"]:
        print(
            f"{row['case']:<48} {row['median_ms']:8.1f} ms median {row['max_ms']:8.1f} ms max"
            f"  ({row['source']})"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
