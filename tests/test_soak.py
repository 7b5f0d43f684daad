"""bench/soak.py, for a few seconds: it runs a real service, samples it, and finds every
acknowledged metric stored exactly once (the 10-minute run and its figures are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._helpers import ROOT, clean_env


def test_soak_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration-s", "3", "--sample-s", "0.5",
         "--rate", "40", "--batch", "5", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["metrics_acknowledged"] > 0 and result["statuses"].get("200", 0) > 0
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["integrity"] == "ok"
    assert result["service_exit_code"] == 0
    assert len(result["samples"]) >= 4
    sample = result["samples"][-1]
    assert (
        sample["rss_kib"] > 0
        and sample["fds"] > 0
        and sample["wal_bytes"] > 0
        and sample["scrape_bytes"] > 0
    )
    assert "rss_slope_mib_per_min" in result["verdict"]
    assert "p99_ms" in done.stdout and "lost 0" in done.stdout
