"""bench/sqlite_writer.py runs end to end on a tiny load: both ways of committing store the same
rows and rollups (no timing asserted; the figures are in docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys

from tests._helpers import ROOT, clean_env


def test_sqlite_writer_bench_compares_both_ways_on_identical_data() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "bench/sqlite_writer.py",
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
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("10", "thread"),
        ("10", "aiosqlite"),
        ("1", "thread"),
        ("1", "aiosqlite"),
    ]
    # Every metric of the 5 commits of 4 requests stored, both ways.
    assert [int(r[-1]) for r in rows] == [200, 200, 20, 20]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)
