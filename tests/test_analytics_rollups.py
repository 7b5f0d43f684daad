"""Rollups: kept equal to the raw rows by every commit, backfilled by migration 2 on a version 1
database, compacted into days without changing any answer, and kept past raw retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app, storage
from metrics_service.analytics import queries
from metrics_service.storage import rollups
from metrics_service.storage.sqlite import SyncReader, migrations
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from metrics_service.validation import Validator
from tests._analytics_seed import make_seed, post_seed, seed_rows
from tests._helpers import ADMIN_KEY, INGEST_KEY

ADMIN = {"X-API-Key": ADMIN_KEY}
VIEWS = [v for v in queries.VIEWS if v != "timeseries"]


def run_view(conn: sqlite3.Connection, view: str, query: dict[str, str]) -> dict[str, Any]:
    """A view answered from a plain connection (the service reads through aiosqlite)."""
    conn.execute("BEGIN")
    try:
        return asyncio.run(queries.run(SyncReader(conn), view, query))
    finally:
        conn.execute("COMMIT")


def answers(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    span = {"since": f"{now - 4 * 86_400:.3f}", "until": f"{now:.3f}"}
    out = {
        view: run_view(
            conn, view, {**span, "limit": "1000"} if "limit" in queries.VIEWS[view][2] else span
        )
        for view in VIEWS
    }
    out["timeseries"] = run_view(conn, "timeseries", {**span, "resolution": "hour"})
    for body in out.values():
        body.pop("source")  # where the numbers came from may differ; the numbers may not
    return out


def insert_as_old_schema(conn: sqlite3.Connection, part: dict[str, list[tuple[Any, ...]]]) -> None:
    """Insert rows built today into an older schema: only the columns its tables have (the
    columns later migrations add are empty in those rows' events)."""
    for kind, rows in part.items():
        sql = storage.INSERT_SQL[kind]
        names = sql[sql.index("(") + 1 : sql.index(")")].split(", ")
        table = storage.TABLE_OF_TYPE[kind]
        have = {r[1] for r in conn.execute(f"PRAGMA table_xinfo({table})")}
        keep = [i for i, n in enumerate(names) if n in have]
        for row in rows:
            assert all(row[i] is None for i in range(len(names)) if i not in keep)
        conn.executemany(
            f"INSERT INTO {table} ({', '.join(names[i] for i in keep)})"
            f" VALUES ({', '.join('?' * len(keep))})",
            [tuple(row[i] for i in keep) for row in rows],
        )


def rollup_rows(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4, 5").fetchall()
        for t in rollups.TABLES
    }


def test_every_commit_keeps_hour_rollups_equal_to_aggregating_the_raw_rows(tmp_path: Path) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    _, parts = seed_rows(settings)
    conn, _ = storage.open_database(settings.db_path)
    for i in range(0, len(parts), 2):
        storage.insert_rows(conn, parts[i : i + 2])
    for cube in rollups.CUBES:
        if "hour" not in cube.levels:
            continue
        table = cube.table("hour")
        kept = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5, 6").fetchall()
        conn.execute(f"DELETE FROM {table}")
        conn.execute(sqlite_rollups._from_raw_sql(cube, "hour", "1"))
        rebuilt = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5, 6").fetchall()
        assert [tuple(map(_round, r)) for r in kept] == [tuple(map(_round, r)) for r in rebuilt], (
            table
        )
        assert kept, table
    conn.close()


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


def test_a_version_1_database_is_backfilled_by_migration_2_with_the_same_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(db_path=tmp_path / "old.db")
    now, parts = seed_rows(settings, registry=False)
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
        old, applied = storage.open_database(tmp_path / "old.db")
        assert applied == [1]
    for part in parts:  # as a version 1 service stored them: raw rows only
        insert_as_old_schema(old, part)
    old.close()
    migrated, applied = storage.open_database(tmp_path / "old.db")
    assert applied[0] == 2
    fresh, _ = storage.open_database(tmp_path / "new.db")
    storage.insert_rows(fresh, parts)
    # The fresh database got days through the late-event path, the migrated one from the backfill.
    assert _same(rollup_rows(migrated), rollup_rows(fresh))
    assert _strip(answers(migrated, now)) == _strip(answers(fresh, now))
    migrated.close()
    fresh.close()


def _same(a: dict[str, list[tuple[Any, ...]]], b: dict[str, list[tuple[Any, ...]]]) -> bool:
    return all(
        [tuple(map(_round, r)) for r in a[t]] == [tuple(map(_round, r)) for r in b[t]] for t in a
    )


def _strip(body: Any) -> Any:
    return json.loads(json.dumps(body).replace(".000Z", "Z"))


def test_compaction_fills_days_and_changes_no_answer(tmp_path: Path) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    conn, _ = storage.open_database(settings.db_path)
    week_ago = (int(now * 1000) - 7 * rollups.DAY_MS) // rollups.DAY_MS * rollups.DAY_MS
    conn.execute("UPDATE rollup_watermark SET until_ms = ?", (week_ago,))
    storage.insert_rows(conn, parts)
    assert conn.execute("SELECT count(*) FROM rollup_tools_day").fetchone() == (0,)
    before = answers(conn, now)
    assert sqlite_rollups.compact(conn, int(now * 1000)) == 7
    assert sqlite_rollups.day_watermark(conn) == int(now * 1000) // rollups.DAY_MS * rollups.DAY_MS
    assert conn.execute("SELECT count(*) FROM rollup_tools_day").fetchone()[0] > 0
    assert conn.execute("SELECT count(*) FROM rollup_users_day").fetchone()[0] > 0
    assert answers(conn, now) == before
    assert sqlite_rollups.compact(conn, int(now * 1000)) == 0

    # A late event for a compacted day goes to that day's rollup too.
    late = Validator(settings).decode(
        json.dumps(
            {
                "service": "svc",
                "version": "1",
                "metrics": [
                    {
                        "type": "tool_execution",
                        "timestamp": now - 2.5 * 86_400,
                        "duration_ms": 5,
                        "dimensions": {
                            "method": "tools/call",
                            "tool_name": "late",
                            "success": False,
                        },
                    },
                ],
            }
        ).encode()
    )
    storage.insert_rows(conn, [late.rows])
    after = answers(conn, now)
    assert after["summary"]["calls"] == before["summary"]["calls"] + 1
    assert after["summary"]["errors"] == before["summary"]["errors"] + 1
    assert {r["tool"] for r in after["tools"]["rows"]} >= {"late"}
    conn.close()


def test_rollups_outlive_raw_retention_and_have_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    settings = Settings(db_path=tmp_path / "m.db", admin_api_key=ADMIN_KEY)
    seed = make_seed(300)
    since_ms = (int(seed.now * 1000) - 4 * rollups.DAY_MS) // rollups.HOUR_MS * rollups.HOUR_MS
    span = {"since": str(since_ms / 1000), "until": f"{seed.now:.3f}"}
    with TestClient(create_app(settings)) as client:
        post_seed(client, seed, {"X-API-Key": INGEST_KEY})
        assert client.get("/analytics/summary", params=span, headers=ADMIN).json()["calls"] == len(
            seed.tools()
        )
        # Raw tool rows kept one day: the whole history stays in the rollups.
        client.put(
            "/admin/retention/policies/tool_metrics", json={"retention_days": 1}, headers=ADMIN
        )
        done = client.post("/admin/retention/cleanup?dry_run=false", headers=ADMIN).json()["tables"]
        assert next(t for t in done if t["table"] == "tool_metrics")["rows"] > 0
        assert next(t for t in done if t["table"] == "rollup_tools_hour")["rows"] == 0
        assert client.get("/analytics/summary", params=span, headers=ADMIN).json()["calls"] == len(
            seed.tools()
        )

    # Rollups have their own retention, by whole days so that hours and days agree.
    with TestClient(create_app(settings.model_copy(update={"rollup_retention_days": 2}))) as client:
        done = client.post("/admin/retention/cleanup?dry_run=false", headers=ADMIN).json()["tables"]
        assert {t["retention_days"] for t in done if t["table"].startswith("rollup_")} == {2}
        cutoff = (int(time.time() * 1000) - 2 * rollups.DAY_MS) // rollups.DAY_MS * rollups.DAY_MS
        kept = client.get("/analytics/summary", params=span, headers=ADMIN).json()["calls"]
        assert kept == sum(1 for m in seed.tools() if m["timestamp"] * 1000 >= cutoff)
    conn = sqlite3.connect(settings.db_path)
    for table in rollups.TABLES:
        assert conn.execute(
            f"SELECT count(*) FROM {table} WHERE bucket < ?", (cutoff,)
        ).fetchone() == (0,), table
    conn.close()


TOOL_AND_CLIENT = [
    ("tools", {"client": "cursor"}),
    ("tools", {"client": "claude", "success": "false"}),
    ("clients", {"tool": "search"}),
    ("clients", {"tool": "fetch", "server": "srv-1"}),
]


def _tool_and_client(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # An hour-unaligned start: the answer mixes day, hour and raw segments.
    span = {"since": f"{now - 3.7 * 86_400:.3f}", "until": f"{now:.3f}", "limit": "1000"}
    return {
        f"{view}?{extra}": run_view(conn, view, {**span, **extra})
        for view, extra in TOOL_AND_CLIENT
    }


def _v3_rollups(m: pytest.MonkeyPatch) -> None:
    """Make the code maintain and compact only the cubes a version 3 service had."""
    m.setattr(rollups, "CUBES", rollups._V2_CUBES)
    m.setattr(
        rollups,
        "_BY_KIND",
        {k: [s for s in v if s.cube in rollups._V2_CUBES] for k, v in rollups._BY_KIND.items()},
    )


def _history(
    conn: sqlite3.Connection,
    now: float,
    parts: list[dict[str, list[tuple[Any, ...]]]],
    old_schema: bool = False,
) -> None:
    """As a service that has run all along: a week of days compacted after the fact
    (``old_schema``: into the raw tables of an older version, as ``insert_rows`` does)."""
    week_ago = (int(now * 1000) - 7 * rollups.DAY_MS) // rollups.DAY_MS * rollups.DAY_MS
    conn.execute("UPDATE rollup_watermark SET until_ms = ?", (week_ago,))
    if old_schema:
        # As versions before 8 did: the rows' rollups upserted in their commit, no fold marks.
        conn.execute("BEGIN IMMEDIATE")
        for part in parts:
            insert_as_old_schema(conn, part)
        sqlite_rollups._upsert(conn, parts, sqlite_rollups.day_watermark(conn))
        conn.execute("COMMIT")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sqlite_rollups, "catch_up", lambda conn, pending=None: 0)
            assert sqlite_rollups.compact(conn, int(now * 1000)) == 7
        return
    storage.insert_rows(conn, parts)
    assert sqlite_rollups.compact(conn, int(now * 1000)) == 7


def test_tool_and_client_together_are_read_from_rollups_and_equal_the_raw_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    conn, _ = storage.open_database(settings.db_path)
    _history(conn, now, parts)
    assert conn.execute("SELECT count(*) FROM rollup_tool_clients_day").fetchone()[0] > 0
    got = _tool_and_client(conn, now)
    with monkeypatch.context() as m:
        m.setattr(
            rollups, "CUBES", rollups._V2_CUBES
        )  # no cube holds both: every raw row of the range
        raw = _tool_and_client(conn, now)
    for case, body in got.items():
        assert body.pop("source") == "rollup", case
        assert raw[case].pop("source") == "raw", case
        assert body["rows"], case
    assert got == raw
    cursor = got["tools?{'client': 'cursor'}"]["rows"]
    assert (
        sum(r["calls"] for r in cursor)
        == run_view(
            conn,
            "clients",
            {"since": f"{now - 3.7 * 86_400:.3f}", "until": f"{now:.3f}", "client": "cursor"},
        )["rows"][0]["calls"]
    )
    conn.close()


def test_a_version_3_database_is_migrated_to_4_with_the_tool_and_client_cube_backfilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(db_path=tmp_path / "old.db")
    now, parts = seed_rows(settings, registry=False)
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
        _v3_rollups(m)
        old, applied = storage.open_database(tmp_path / "old.db")
        assert applied == [1, 2, 3]
        _history(old, now, parts, old_schema=True)
        assert (
            old.execute(
                "SELECT name FROM sqlite_master WHERE name LIKE 'rollup_tool_clients%'"
            ).fetchall()
            == []
        )
        before = _tool_and_client(old, now)
    old.close()
    migrated, applied = storage.open_database(tmp_path / "old.db")
    assert applied == [v for v, _, _ in migrations.MIGRATIONS if v >= 4]
    assert migrations.current_version(migrated) == migrations.LATEST_VERSION
    fresh, _ = storage.open_database(tmp_path / "new.db")
    _history(fresh, now, parts)
    # Migrated: hours and days from the raw rows; fresh: hours at commit, days by compaction.
    tables = [rollups._V4_CUBES[0].table(level) for level in ("hour", "day")]
    rows_migrated, rows_fresh = rollup_rows(migrated), rollup_rows(fresh)
    assert all(rows_migrated[t] for t in tables)
    assert _same({t: rows_migrated[t] for t in tables}, {t: rows_fresh[t] for t in tables})
    assert _same(rows_migrated, rows_fresh)
    after = _tool_and_client(migrated, now)
    for case, body in after.items():
        assert body.pop("source") == "rollup", case
        assert before[case].pop("source") == "raw", case
    assert after == before
    migrated.close()
    fresh.close()
