"""bench/postgres_replicas.py runs end to end on a short load: SQLite, one and two PostgreSQL
replicas over HTTP (no timing asserted: numbers are for bench/; the bench itself fails unless
the rows stored equal the metrics acknowledged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests._helpers import run_bench
from tests._servers import PostgresServer


def test_bench_drives_each_setup_and_reports_latency_memory_and_cpu(
    postgres_cluster: PostgresServer, tmp_path: Path
) -> None:
    # (postgres_cluster: skipped with the install command where PostgreSQL is missing; the
    # bench starts a cluster of its own.)
    out = tmp_path / "report.json"
    args = ("--batch", "10", "--duration", "0.5", "--warmup", "0.2", "--concurrency", "4")
    run_bench("postgres_replicas.py", *args, "--json", str(out))
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    assert [(r["backend"], r["replicas"]) for r in rows] == [
        ("sqlite", 1),
        ("postgresql", 1),
        ("postgresql", 2),
    ]
    for row in rows:
        assert row["metrics_s"] > 0 and row["service_us"] > 0 and row["peak_rss_mb"] > 20
        assert row["p99_ms"] >= row["p50_ms"] > 0
    assert all(r["server_us"] > 0 for r in rows if r["backend"] == "postgresql")
