"""CPU per metric of each stage of the ingest path, one stage at a time, in one process.

    .venv/bin/python bench/stages.py [--requests 80] [--batch 100] [--per-commit 8] [--repeat 7]

Where ``bench/breakdown.py`` splits the CPU of the real server under load (the honest total, but
noisy on a shared machine), this times each stage alone on the same bodies (``bench/_workload.py``)
and keeps the minimum of ``--repeat`` rounds, steady enough to see a change of a few tenths of a
microsecond:

- ``validation``: ``Validator.decode`` of each request body;
- ``insert``: the raw rows of ``--per-commit`` requests per transaction (as the service inserts
  them: 32 rows per statement, only the columns some row sets; ``COMMIT`` with
  ``synchronous=FULL``), without the rollups;
- ``rollups``: the rollup upserts of the same commits (its own transactions; the service
  folds them in every ``METRICS_ROLLUP_FOLD_INTERVAL_S`` instead, see storage/sqlite/rollups.py);
- ``opentelemetry``: ``Telemetry.on_commit`` for the same commits.

Prints one JSON object: microseconds of thread CPU per metric for each stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _workload import bodies

from metrics_service import storage
from metrics_service.settings import Settings
from metrics_service.storage.sqlite import database, rollups
from metrics_service.telemetry import Telemetry
from metrics_service.validation import Validator


def best_us_per_metric(fn: Callable[[], object], metrics: int, repeat: int) -> float:
    rounds = []
    for _ in range(repeat):
        gc.collect()
        started = time.thread_time()
        fn()
        rounds.append(time.thread_time() - started)
    return min(rounds) / metrics * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--per-commit", type=int, default=8, help="requests per transaction")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    settings = Settings(db_path=workdir / "metrics.db", otel_prometheus_enabled=False)
    validator = Validator(settings)
    payloads = bodies(args.requests, args.batch)
    metrics = args.requests * args.batch
    batches = [validator.decode(body) for body in payloads]
    commits = [batches[i : i + args.per_commit] for i in range(0, len(batches), args.per_commit)]
    gc.freeze()  # as the server does after start-up (server.tune_gc)
    conn, _ = storage.open_database(settings.db_path)
    telemetry = Telemetry(settings)

    def validate() -> None:
        for body in payloads:
            validator.decode(body)

    def insert() -> None:
        for commit in commits:
            conn.execute("BEGIN IMMEDIATE")
            for kind in {kind for batch in commit for kind in batch.rows}:
                rows = [row for batch in commit for row in batch.rows.get(kind, ())]
                database._insert_kind(conn, kind, rows)
            conn.execute("COMMIT")

    def maintain() -> None:
        for commit in commits:
            conn.execute("BEGIN IMMEDIATE")
            rollups._upsert(conn, [batch.rows for batch in commit], rollups.day_watermark(conn))
            conn.execute("COMMIT")

    def record() -> None:
        for commit in commits:
            telemetry.on_commit(commit, sum(batch.accepted for batch in commit), 0.01)

    result = {
        name: round(best_us_per_metric(fn, metrics, args.repeat), 3)
        for name, fn in (
            ("validation", validate),
            ("insert", insert),
            ("rollups", maintain),
            ("opentelemetry", record),
        )
    }
    # What the rounds did, so that a run that timed nothing cannot pass for a fast one.
    stored = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in storage.TABLES)
    recorded = sum(telemetry.totals["metrics_service_metrics_accepted"].values.values())
    conn.close()
    telemetry.shutdown()
    print(json.dumps({**result, "metrics": metrics, "stored": stored, "recorded": recorded}))


if __name__ == "__main__":
    main()
