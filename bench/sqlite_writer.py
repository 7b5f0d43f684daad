"""Why the SQLite writer keeps its own thread: a group commit in one hop against ``aiosqlite``'s
hop per statement.

    .venv/bin/python bench/sqlite_writer.py                  # batch 100 and 1, 16 requests a commit
    .venv/bin/python bench/sqlite_writer.py --commits 400 --runs 5

The same group commits (``--parts`` requests of ``--batch`` metrics from the bench workload,
validated as the service does) go into a fresh database (``synchronous=FULL``, WAL) two ways:

- ``thread``: the backend's writer, ``database.insert_rows`` run whole on the dedicated thread
  (one hop from the event loop per commit: claims, inserts, rollup upserts, ``COMMIT``);
- ``aiosqlite``: the same statements through an ``aiosqlite`` connection, each ``execute`` /
  ``executemany`` awaited (``BEGIN IMMEDIATE``, one insert per family, one upsert per rollup
  cube and level, ``COMMIT``): a hop per statement.

While the commits run, the event loop also serves ``--tickers`` coroutines that wake every
millisecond, standing in for the requests the loop serves meanwhile. Reported per way: commits/s,
metrics/s, event-loop CPU and total process CPU per metric (median of ``--runs``). After each
run both databases are checked to hold every metric and identical rollup tables (exit 1 if not).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aiosqlite
from _workload import bodies

from metrics_service.settings import Settings
from metrics_service.storage import rollups
from metrics_service.storage.schema import TABLES
from metrics_service.storage.sqlite import SqliteBackend, database
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from metrics_service.validation import Validator

Parts = list[dict[str, list[tuple[Any, ...]]]]
CUBES = rollups.TABLES


def workload(batch: int, parts: int, commits: int) -> list[Parts]:
    validator = Validator(Settings(db_path=Path("unused.db")))
    rows = [validator.decode(b).rows for b in bodies(parts * commits, batch)]
    return [rows[i * parts : (i + 1) * parts] for i in range(commits)]


async def _thread(path: Path, commits: list[Parts]) -> None:
    storage = SqliteBackend(Settings(db_path=path))
    await storage.open()
    try:
        for parts in commits:
            await storage.insert_batches(parts)
    finally:
        await storage.close()


async def _aiosqlite(path: Path, commits: list[Parts]) -> None:
    database.open_database(path)[0].close()  # migrate first, as the service does
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute("PRAGMA synchronous = FULL")
        for parts in commits:
            await conn.execute("BEGIN IMMEDIATE")
            for kind in {k for p in parts for k in p}:
                rows = [r for p in parts for r in p.get(kind, ())]
                await conn.executemany(database.INSERT_SQL[kind], rows)
            (watermark,) = next(iter(await conn.execute_fetchall(sqlite_rollups._WATERMARK_SQL)))
            for cube, level, states in rollups.updates(parts, watermark):
                await conn.executemany(sqlite_rollups._UPSERT[(cube.name, level)], list(states))
            await conn.execute("COMMIT")
    finally:
        await conn.close()


async def _measure(way: str, path: Path, commits: list[Parts], tickers: int) -> dict[str, float]:
    stop = asyncio.Event()

    async def tick() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.001)

    ticking = [asyncio.create_task(tick()) for _ in range(tickers)]
    cpu, thread_cpu, started = time.process_time(), time.thread_time(), time.perf_counter()
    await (_thread if way == "thread" else _aiosqlite)(path, commits)
    elapsed = time.perf_counter() - started
    loop_cpu, total_cpu = time.thread_time() - thread_cpu, time.process_time() - cpu
    stop.set()
    await asyncio.gather(*ticking)
    metrics = sum(len(r) for parts in commits for p in parts for r in p.values())
    return {
        "commits_per_s": len(commits) / elapsed,
        "metrics_per_s": metrics / elapsed,
        "loop_cpu_us_per_metric": loop_cpu / metrics * 1e6,
        "cpu_us_per_metric": total_cpu / metrics * 1e6,
    }


def _contents(path: Path) -> tuple[int, dict[str, list[tuple[Any, ...]]]]:
    """Raw rows stored, and every rollup table's rows."""
    conn = sqlite3.connect(path)
    try:
        stored = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
        cubes = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in CUBES}
    finally:
        conn.close()
    return stored, cubes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="100,1", help="metrics per request")
    parser.add_argument("--parts", type=int, default=16, help="requests per group commit")
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tickers", type=int, default=16)
    args = parser.parse_args()
    print("batch way        commits/s  metrics/s  loop CPU us/metric  CPU us/metric  stored")
    for batch in (int(b) for b in args.batch.split(",")):
        commits = workload(batch, args.parts, args.commits)
        results: dict[str, list[dict[str, float]]] = {"thread": [], "aiosqlite": []}
        metrics = sum(len(r) for parts in commits for p in parts for r in p.values())
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                paths = {way: Path(tmp) / f"{way}.db" for way in results}
                for way, path in paths.items():  # alternating, so that drift hits both
                    results[way].append(asyncio.run(_measure(way, path, commits, args.tickers)))
                contents = {way: _contents(path) for way, path in paths.items()}
            if contents["thread"] != contents["aiosqlite"] or contents["thread"][0] != metrics:
                sys.exit(f"batch {batch}, run {run}: the two ways stored different data")
        for way, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rates = f"{med['commits_per_s']:>10,.0f} {med['metrics_per_s']:>10,.0f}"
            cpu = f"{med['loop_cpu_us_per_metric']:>19.1f} {med['cpu_us_per_metric']:>14.1f}"
            print(f"{batch:>5} {way:<10} {rates} {cpu} {metrics:>7}")


if __name__ == "__main__":
    main()
