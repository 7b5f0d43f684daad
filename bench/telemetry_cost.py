"""Cost per metric of the OpenTelemetry recording, next to the cost of validating the same metric.

    .venv/bin/python bench/telemetry_cost.py [--metrics 100000]

Builds the real Telemetry (Prometheus reader on its own registry, no HTTP server) and times
``on_commit`` over batches of the four families, in the bulk mode the service uses and in the
one-record-per-value fallback, and ``Validator.decode`` on the same bodies for scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _workload import bodies

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
    results = {"validate_us_per_metric": round(validate_us, 2)}
    for mode in ("bulk", "per_value"):
        telemetry = Telemetry(settings)
        telemetry.bulk = mode == "bulk"
        t = time.perf_counter()
        for i in range(0, len(batches), 16):  # a commit groups ~16 requests
            group = batches[i : i + 16]
            telemetry.on_commit(group, sum(b.accepted for b in group), 0.001)
        telemetry.hand_over()  # what a collection does: the pending values into the SDK
        results[f"otel_{mode}_us_per_metric"] = round(
            (time.perf_counter() - t) / args.metrics * 1e6, 2
        )
        telemetry.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
