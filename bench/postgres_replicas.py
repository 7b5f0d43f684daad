"""The service over HTTP on SQLite, on PostgreSQL, and as two replicas on one PostgreSQL.

    .venv/bin/python bench/postgres_replicas.py                  # batch 100 and 1, c16
    .venv/bin/python bench/postgres_replicas.py --batch 100 --duration 10

Each setup starts fresh service processes (durable acknowledgement, default settings) and, for
PostgreSQL, a fresh database on one cluster started by tests/_servers.py (server defaults, fsync
on), then drives ``POST /metrics`` with bench/ingest.py's load generator: ``--concurrency``
keep-alive connections split evenly over the replicas, a warm-up, then ``--duration`` seconds
measured. Reported: metrics/s acknowledged, p50 and p99 of the measured requests' latency, the
highest peak RSS of the service processes (VmHWM), CPU per metric in the service processes
(summed) and in PostgreSQL (postmaster and backends). Rows are counted afterwards against the
metrics acknowledged. On this 2-core machine two replicas and the server share the same two
cores: the figure shows what a second process adds when cores are the limit, not a second
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import bodies  # noqa: E402
from ingest import Load, Server, drive  # noqa: E402
from postgres_ingest import server_cpu_s  # noqa: E402

from metrics_service import storage  # noqa: E402
from tests._helpers import db_rows  # noqa: E402
from tests._servers import PostgresServer, start_postgres  # noqa: E402


def run_setup(
    backend: str,
    replicas: int,
    pg: PostgresServer,
    batch: int,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    run: int,
) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    database = f"replicas_{run}_{int(time.time() * 1000)}"
    env: dict[str, str] = {}
    if backend == "postgresql":
        pg.psql(f"CREATE DATABASE {database}", database="postgres")
        env["METRICS_DATABASE_URL"] = pg.url(database)
    servers = [
        Server("service", None, db_path=folder / "m.db", extra_env=env) for _ in range(replicas)
    ]
    try:
        for server in servers:
            server.start()
        payloads = bodies(max(64, 2000 // batch), batch)
        per = max(1, concurrency // replicas)

        async def load() -> list[tuple[Load, Load]]:
            return await asyncio.gather(
                *(drive(s.port, payloads, per, duration_s, warmup_s) for s in servers)
            )

        cpu0 = [s.cpu_seconds() for s in servers]
        pg0 = server_cpu_s(pg)
        results = asyncio.run(load())
        # Only the measured phase: subtract the warm-up's share of the CPU by the time ratio
        # would be a guess, so CPU is over warm-up and measurement, per metric of both.
        cpu = sum(s.cpu_seconds() - c for s, c in zip(servers, cpu0, strict=True))
        pg_cpu = server_cpu_s(pg) - pg0
        accepted = sum(m.accepted for _, m in results)
        elapsed = max(m.elapsed_s for _, m in results)
        total = sum(w.accepted + m.accepted for w, m in results)
        latencies = sorted(x for _, m in results for x in m.latencies_ms)
        peak = max(s.peak_rss_mb() for s in servers)
        for server in servers:
            server.stop()
        if backend == "postgresql":
            rows = 0
            for table in storage.TABLES:
                out = pg.psql(f"SELECT count(*) FROM {table}", database=database)
                rows += int(out)
        else:
            rows = sum(
                db_rows(folder / "m.db", f"SELECT count(*) FROM {t}")[0][0] for t in storage.TABLES
            )
        assert rows == total, (rows, total)
        return {
            "metrics_s": accepted / elapsed,
            "service_us": cpu / total * 1e6,
            "server_us": pg_cpu / total * 1e6 if backend == "postgresql" else 0.0,
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "peak_rss_mb": peak,
        }
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
        if backend == "postgresql":
            pg.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)", database="postgres")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pg = start_postgres({"fsync": "on"})
    table: list[dict[str, Any]] = []
    try:
        for batch in args.batch or [100, 1]:
            for backend, replicas in (("sqlite", 1), ("postgresql", 1), ("postgresql", 2)):
                runs = [
                    run_setup(
                        backend,
                        replicas,
                        pg,
                        batch,
                        args.concurrency,
                        args.duration,
                        args.warmup,
                        i,
                    )
                    for i in range(args.runs)
                ]
                row = {
                    "backend": backend,
                    "replicas": replicas,
                    "batch": batch,
                    **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                }
                table.append(row)
                print(
                    f"{backend:>10} x{replicas}  batch {batch:>3}  c{args.concurrency}"
                    f"  {row['metrics_s']:>9.0f} metrics/s"
                    f"  p50 {row['p50_ms']:6.1f} p99 {row['p99_ms']:6.1f} ms"
                    f"  rss {row['peak_rss_mb']:4.0f} MB"
                    f"  service {row['service_us']:6.1f} us/metric"
                    f"  postgres {row['server_us']:6.1f} us/metric",
                    flush=True,
                )
    finally:
        pg.stop()
        shutil.rmtree(pg.root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
