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

from metrics_service.settings import Settings
from metrics_service.telemetry import Telemetry
from metrics_service.validation import Validator


def bodies(n_requests: int, batch: int) -> list[bytes]:
    out = []
    for r in range(n_requests):
        metrics = []
        for i in range(batch):
            k = (r * batch + i) % 4
            if k == 0:
                metrics.append({"type": "auth_request", "duration_ms": 5 + i % 50, "dimensions": {"success": i % 10 != 0, "method": "jwt", "server": "auth-1", "user_hash": f"u{i}"}})
            elif k == 1:
                metrics.append({"type": "tool_execution", "duration_ms": 20 + i % 300, "dimensions": {"method": "tools/call", "tool_name": f"tool-{i % 12}", "server_name": "srv", "client_name": "claude", "success": True, "input_size_bytes": 100 + i, "output_size_bytes": 2000 + i}})
            elif k == 2:
                metrics.append({"type": "tool_discovery", "duration_ms": 40, "dimensions": {"query": f"q{i}", "results_count": i % 10, "embedding_time_ms": 12, "search_time_ms": 3}})
            else:
                metrics.append({"type": "protocol_latency", "duration_ms": 100 + i, "dimensions": {"flow_step": "initialize->tools/list", "server_name": "srv"}})
        out.append(json.dumps({"service": "svc", "version": "1", "metrics": metrics}).encode())
    return out


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
        results[f"otel_{mode}_us_per_metric"] = round((time.perf_counter() - t) / args.metrics * 1e6, 2)
        telemetry.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
