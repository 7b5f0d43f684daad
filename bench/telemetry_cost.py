"""Cost per metric of the OpenTelemetry recording, next to the cost of validating the same metric,
and the cost of one collection (what a Prometheus scrape or an OTLP export reads).

    .venv/bin/python bench/telemetry_cost.py [--metrics 100000]

Builds the real Telemetry (Prometheus collector on its own registry, no HTTP server), times
``on_commit`` over batches of the four families and ``Validator.decode`` on the same bodies for
scale, then one Prometheus exposition and one OTLP ``MetricsData`` of what was recorded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _workload import bodies
from prometheus_client import generate_latest

from metrics_service.settings import Settings
from metrics_service.telemetry import Telemetry
from metrics_service.validation import Validator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    settings = Settings(db_path=Path(tempfile.mkdtemp()) / "m.db", otel_prometheus_port=0)
    validator = Validator(settings)
    raw = bodies(args.metrics // args.batch, args.batch)
    t = time.perf_counter()
    batches = [validator.decode(b) for b in raw]
    validate_us = (time.perf_counter() - t) / args.metrics * 1e6
    telemetry = Telemetry(settings)
    t = time.perf_counter()
    for i in range(0, len(batches), 16):  # a commit groups ~16 requests
        group = batches[i : i + 16]
        telemetry.on_commit(group, sum(b.accepted for b in group), 0.001)
    record_us = (time.perf_counter() - t) / args.metrics * 1e6
    t = time.perf_counter()
    exposition = generate_latest(telemetry.registry)
    scrape_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    data = telemetry.collect()
    collect_ms = (time.perf_counter() - t) * 1000
    series = sum(len(m.data.data_points) for m in data.resource_metrics[0].scope_metrics[0].metrics)
    telemetry.shutdown()
    print(
        json.dumps(
            {
                "validate_us_per_metric": round(validate_us, 2),
                "otel_us_per_metric": round(record_us, 2),
                "prometheus_scrape_ms": round(scrape_ms, 2),
                "otlp_collect_ms": round(collect_ms, 2),
                "series": series,
                "exposition_bytes": len(exposition),
            }
        )
    )


if __name__ == "__main__":
    main()
