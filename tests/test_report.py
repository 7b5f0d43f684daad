"""``metrics-service report`` on the database file, with no service running."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from metrics_service import Settings, storage
from tests._analytics_seed import make_seed, seed_rows
from tests._helpers import cli


def seeded_db(tmp_path: Path) -> tuple[Path, float]:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    conn, _ = storage.open_database(settings.db_path)
    storage.insert_rows(conn, parts)
    conn.close()
    return settings.db_path, now


def test_report_prints_summary_top_tools_clients_and_errors(tmp_path: Path) -> None:
    db, _ = seeded_db(tmp_path)
    seed = make_seed(500)  # the same seeded events seed_rows stored
    calls = seed.tools()
    out = cli(db, "report", "--since", "4d")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"calls             {len(calls) + 1:,}" in text  # and one tools/list without a tool
    for title in ("Top tools", "Top clients", "Most errors"):
        assert title in text
    per_tool = Counter(m["dimensions"]["tool_name"] for m in calls)
    top_tool, top_calls = per_tool.most_common(1)[0]
    tools_section = text.split("Top tools")[1].split("Top clients")[0].splitlines()
    assert tools_section[2].split()[:3] == [
        top_tool,
        next(
            m["dimensions"]["server_name"]
            for m in calls
            if m["dimensions"]["tool_name"] == top_tool
        ),
        str(top_calls),
    ]

    body = json.loads(cli(db, "report", "--since", "4d", "--format", "json", "--limit", "2").stdout)
    assert body["summary"]["calls"] == len(calls) + 1
    assert len(body["tools"]) == 2 and body["tools"][0]["tool"] == top_tool
    assert all(r["errors"] > 0 for r in body["errors"])

    rows = list(
        csv.DictReader(io.StringIO(cli(db, "report", "--since", "4d", "--format", "csv").stdout))
    )
    assert rows[0]["section"] == "summary" and int(rows[0]["calls"]) == len(calls) + 1
    assert {r["tool"] for r in rows if r["section"] == "tool"} == set(per_tool)


def test_report_filters_by_service_and_refuses_a_bad_since(tmp_path: Path) -> None:
    db, _ = seeded_db(tmp_path)
    other = json.loads(
        cli(db, "report", "--since", "4d", "--service", "other", "--format", "json").stdout
    )
    assert other["summary"]["calls"] == 0 and other["tools"] == []
    bad = cli(db, "report", "--since", "last tuesday")
    assert (
        bad.returncode == 2
        and "--since" in bad.stderr
        and "(format)" in bad.stderr
        and "Traceback" not in bad.stderr
    )
