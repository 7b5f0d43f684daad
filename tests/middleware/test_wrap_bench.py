"""bench/wrap_overhead.py runs end to end on a tiny load (its numbers are in the docs, not here)."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO_ROOT

_LINE = re.compile(
    r"^(stdio|http)\s+direct median [\d.]+ ms p99 [\d.]+ ms \| metered median [\d.]+ ms"
    r" p99 [\d.]+ ms \| added median -?[\d.]+ ms p99 -?[\d.]+ ms$"
)


def test_the_wrap_benchmark_reports_both_paths() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "wrap_overhead.py"), "--calls", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [_LINE.match(line) is not None for line in lines] == [True, True], lines
    assert [line.split()[0] for line in lines] == ["stdio", "http"]
