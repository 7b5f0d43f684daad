"""The performance benches run end to end on a tiny load (no timing asserted: the numbers are for
the README, measured with bench/ on a quiet machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._helpers import ROOT, clean_env


def run(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=clean_env(),
        cwd=ROOT,
    )


def test_ingest_bench_measures_service_and_baselines_and_counts_every_acknowledged_metric(
    tmp_path: Path,
) -> None:
    out = run(
        [
            "bench/ingest.py",
            "--batch",
            "3",
            "--concurrency",
            "2",
            "--runs",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--expired",
            "2000",
            "--sample-every",
            "0.5",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    runs = {r["kind"]: r for r in report["runs"]}
    assert set(runs) == {"baseline", "lean", "service"}
    service = runs["service"]
    assert service["statuses"].get("200", 0) > 0 and set(service["statuses"]) == {"200"}
    assert service["acknowledged"] == service["stored"] > 0 and service["missing"] == 0
    assert service["expired_left"] == 0  # retention deleted the expired history meanwhile
    assert service["samples"] and all(s["rss_mb"] > 0 and s["fds"] > 0 for s in service["samples"])
    for base in ("baseline", "lean"):  # both parse every body of the workload
        assert runs[base]["metrics_per_s"] > 0 and set(runs[base]["statuses"]) == {"200"}
    row = report["summary"][0]
    assert row["service_missing"] == 0 and row["ratio"] > 0 and row["lean_ratio"] > 0
    assert "ratio" in out.stdout  # the table


def test_telemetry_cost_bench_reports_each_mode() -> None:
    out = run(["bench/telemetry_cost.py", "--metrics", "2000"])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {
        "validate_us_per_metric",
        "otel_us_per_metric",
        "prometheus_scrape_ms",
        "otlp_collect_ms",
        "series",
        "exposition_bytes",
    }
    assert all(v > 0 for v in result.values())
    # 2,000 mixed metrics of the workload: every family of the four kinds has series.
    assert result["series"] >= 20 and result["exposition_bytes"] > 5_000


def test_middleware_overhead_bench_times_every_path() -> None:
    out = run(
        ["bench/middleware_overhead.py", "--events", "200", "--requests", "50", "--repeat", "1"]
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line and not line.startswith("path")]
    timed = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in rows}
    assert "MCP tools/call through the 2.x middleware (overhead)" in timed
    assert "ASGI auth route, recorded (overhead)" in timed and len(timed) >= 8


def test_breakdown_bench_splits_the_cpu_per_metric_by_stage() -> None:
    out = run(["bench/breakdown.py", "--batch", "10", "--concurrency", "2", "--duration", "1"])
    assert out.returncode == 0, out.stderr
    stages = {
        line.split("  ")[1].strip() for line in out.stdout.splitlines()[1:] if line.startswith("  ")
    }
    assert {"storage", "validation", "rollups", "opentelemetry", "total"} <= stages
    assert any(stage.startswith("garbage collection, generation") for stage in stages), out.stdout


def test_stages_bench_times_each_stage_alone() -> None:
    out = run(
        [
            "bench/stages.py",
            "--requests",
            "4",
            "--batch",
            "20",
            "--per-commit",
            "2",
            "--repeat",
            "2",
        ]
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    stages = {"validation", "insert", "rollups", "opentelemetry"}
    assert set(result) == stages | {"metrics", "stored", "recorded"}
    assert all(result[stage] > 0 for stage in stages)
    # Each of the 2 rounds inserted and recorded all 4 x 20 metrics.
    assert result["metrics"] == 80 and result["stored"] == result["recorded"] == 160
