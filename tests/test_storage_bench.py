"""bench/sqlite_writer.py runs end to end on a tiny load: both ways of committing store the same
rows and rollups (no timing asserted; the figures are in docs/performance.md)."""

from __future__ import annotations

from tests._helpers import run_bench


def test_sqlite_writer_bench_compares_both_ways_on_identical_data() -> None:
    stdout = run_bench(
        "sqlite_writer.py",
        "--batch",
        "10,1",
        "--parts",
        "4",
        "--commits",
        "5",
        "--runs",
        "1",
        "--tickers",
        "2",
    )
    rows = [line.split() for line in stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("10", "thread"),
        ("10", "aiosqlite"),
        ("1", "thread"),
        ("1", "aiosqlite"),
    ]
    # Every metric of the 5 commits of 4 requests stored, both ways.
    assert [int(r[-1]) for r in rows] == [200, 200, 20, 20]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)
