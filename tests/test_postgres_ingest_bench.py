"""bench/postgres_ingest.py runs end to end on a short load: both backends, batch 1 and 10,
the analytics probe meanwhile (no timing asserted: numbers are for bench/; the bench itself
fails unless the rows stored equal the metrics acknowledged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests._helpers import run_bench
from tests._servers import PostgresServer


def test_bench_stores_every_acknowledged_metric_and_times_the_query_meanwhile(
    postgres_cluster: PostgresServer, tmp_path: Path
) -> None:
    # (postgres_cluster: skipped with the install command where PostgreSQL is missing; the
    # bench starts a cluster of its own.)
    out = tmp_path / "report.json"
    args = ("--batch", "1", "--batch", "10", "--duration", "1", "--query-every", "0.1")
    stdout = run_bench("postgres_ingest.py", *args, "--json", str(out))
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("sqlite", 1),
        ("postgresql", 1),
        ("sqlite", 10),
        ("postgresql", 10),
    ]
    for row in rows:
        assert row["metrics_s"] > 0 and row["service_us"] > 0
        assert row["query_p99_ms"] >= row["query_p50_ms"] > 0 and row["query_idle_ms"] > 0
    assert all(r["server_us"] > 0 for r in rows if r["backend"] == "postgresql")
    assert stdout.count("query p50") == 4
