"""bench/postgres_analytics.py runs end to end on a tiny history (no timing asserted: numbers are
for bench/)."""

from __future__ import annotations

import json
from typing import Any

from bench.analytics import CASES
from tests._helpers import run_bench


def _bench(url: str, *args: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run_bench("postgres_analytics.py", "--url", url, *args))
    return report


def test_bench_loads_a_history_in_bulk_and_times_every_view(postgres_url: str) -> None:
    quick = ("--days", "2", "--repeat", "1", "--json")
    report = _bench(postgres_url, "--events", "3000", *quick)
    assert report["build"]["bytes"] > 0
    cases = [v["case"].removeprefix("/analytics/") for v in report["views"]]
    assert [c.split("?")[0] for c in cases] == [view for view, _ in CASES]
    assert {v["source"] for v in report["views"]} == {"rollup", "raw"}
    # --reuse times the same history again without building it.
    reused = _bench(postgres_url, "--reuse", *quick)
    assert "build" not in reused
    assert [v["case"] for v in reused["views"]] == [v["case"] for v in report["views"]]
