"""bench/analytics.py runs end to end on a tiny history (no timing asserted: numbers are for
bench/)."""

from __future__ import annotations

import json
from pathlib import Path

from tests._helpers import run_bench


def test_bench_builds_a_history_and_times_every_view(tmp_path: Path) -> None:
    stdout = run_bench(
        "analytics.py",
        "--events",
        "3000",
        "--days",
        "2",
        "--repeat",
        "1",
        "--maintenance-metrics",
        "500",
        "--db",
        str(tmp_path / "bench.db"),
        "--json",
    )
    report = json.loads(stdout)
    views = {v["case"].split("?")[0] for v in report["views"]}
    assert views == {
        f"/analytics/{v}"
        for v in (
            "summary",
            "tools",
            "clients",
            "services",
            "tenants",
            "users",
            "auth",
            "discovery",
            "protocol",
            "timeseries",
        )
    }
    assert {v["source"] for v in report["views"]} == {"rollup", "raw"}
    assert {m["commit_rows"] for m in report["maintenance"]} == {100, 1000, 10_000}
