"""SQLite's rollups take committed rows in every so often ("folding"), not in every commit: the
answers are exact at every moment all the same (the rows not folded yet are read raw), every row
is folded exactly once whoever wrote it, and none is lost to a crash, a retention delete, a
compaction or an id that SQLite gives out again."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics_service import Settings, storage
from metrics_service.errors import StorageError
from metrics_service.storage import rollups
from metrics_service.storage.sqlite import database
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from tests._analytics_seed import seed_rows
from tests._helpers import ADMIN_KEY, INGEST_KEY, ServiceProcess
from tests.test_analytics_rollups import _same, answers, rollup_rows, run_view

Part = dict[str, list[tuple[Any, ...]]]
#: Deferred without a time limit: the tests decide when to fold.
HELD = 3600.0


def _open(path: Path) -> sqlite3.Connection:
    return storage.open_database(path)[0]


def _behind(conn: sqlite3.Connection) -> dict[str, int]:
    """Raw table -> rows above its fold mark."""
    marks = sqlite_rollups.marks(conn)
    return {
        t: conn.execute(f"SELECT count(*) FROM {t} WHERE id > ?", (marks[t],)).fetchone()[0]
        for t in sqlite_rollups.FOLDED
    }


def _hour_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Cube -> events counted in its hour table (days for the day-only cube)."""
    return {
        cube.name: conn.execute(
            f"SELECT coalesce(sum(n), 0) FROM {cube.table(cube.levels[-1])}"
        ).fetchone()[0]
        for cube in rollups.CUBES
    }


def _close(a: Any, b: Any) -> bool:
    """Equal, but for the last digit of a rounded float: a sum taken in another order (the
    rows not folded are summed by SQLite, the rollups by Python) can land either side of a
    rounding half-way point."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= 2e-3
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    return bool(a == b)


@functools.cache
def _seed() -> tuple[float, list[Part]]:
    return seed_rows(Settings(db_path=Path("unused.db")))


@pytest.fixture
def seeded() -> tuple[float, list[Part]]:
    return _seed()


def test_deferred_commits_answer_exactly_and_fold_from_memory_into_the_same_rollups(
    tmp_path: Path, seeded: tuple[float, list[Part]], monkeypatch: pytest.MonkeyPatch
) -> None:
    now, parts = seeded
    deferred_db, reference = _open(tmp_path / "d.db"), _open(tmp_path / "r.db")
    deferred = database.Deferred(max_age_s=HELD)
    for i in range(0, len(parts), 3):
        database.insert_rows(deferred_db, parts[i : i + 3], (), deferred)
        database.insert_rows(reference, parts[i : i + 3])
    # Nothing folded yet: the rollups are empty, every row is above the marks...
    assert set(_hour_counts(deferred_db).values()) == {0}
    assert sum(_behind(deferred_db).values()) == deferred.pending.rows > 0
    # ...and every view answers what the database that folded each commit answers.
    assert _close(answers(deferred_db, now), answers(reference, now))

    def not_from_the_table(*args: Any) -> None:
        raise AssertionError("one writer's rows are folded from its memory")

    monkeypatch.setattr(sqlite_rollups, "_fold_from_table", not_from_the_table)
    pending = deferred.pending.rows
    assert deferred.catch_up(deferred_db) == pending
    assert sum(_behind(deferred_db).values()) == 0
    assert deferred.pending.parts == ()
    assert _same(rollup_rows(deferred_db), rollup_rows(reference))
    assert _close(answers(deferred_db, now), answers(reference, now))


def test_rows_another_writer_put_in_between_are_read_back_and_folded_once(
    tmp_path: Path, seeded: tuple[float, list[Part]]
) -> None:
    now, parts = seeded
    path = tmp_path / "m.db"
    mine, other, reference = _open(path), _open(path), _open(tmp_path / "r.db")
    deferred = database.Deferred(max_age_s=HELD)
    thirds = [parts[i::3] for i in range(3)]
    database.insert_rows(mine, thirds[0], (), deferred)
    # Another process's commit folds everything above the marks, this writer's rows too.
    database.insert_rows(other, thirds[1])
    assert sum(_behind(mine).values()) == 0
    database.insert_rows(mine, thirds[2], (), deferred)
    assert not deferred.pending.exact  # its pending ids no longer run on from the marks
    assert sum(_behind(mine).values()) > 0
    assert _close(answers(mine, now), answers(other, now))
    deferred.catch_up(mine)
    for third in thirds:
        database.insert_rows(reference, third)
    assert _same(rollup_rows(mine), rollup_rows(reference))
    assert _close(answers(mine, now), answers(reference, now))


def test_a_failed_commit_leaves_the_pending_rows_as_they_were(
    tmp_path: Path, seeded: tuple[float, list[Part]]
) -> None:
    _, parts = seeded
    conn = _open(tmp_path / "m.db")
    deferred = database.Deferred(max_age_s=HELD)
    database.insert_rows(conn, parts[:2], (), deferred)
    before = deferred.pending
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON auth_metrics BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    assert any("auth_request" in p for p in parts[2:4])
    with pytest.raises(StorageError):
        database.insert_rows(conn, parts[2:4], (), deferred)
    assert deferred.pending is before
    conn.execute("DROP TRIGGER refuse")
    # The retry gets the same ids the failed attempt had: the memory must not hold them twice.
    database.insert_rows(conn, parts[2:4], (), deferred)
    reference = _open(tmp_path / "r.db")
    database.insert_rows(reference, parts[:4])
    deferred.catch_up(conn)
    assert _same(rollup_rows(conn), rollup_rows(reference))


def test_retention_folds_first_and_an_id_given_out_again_is_folded_too(
    tmp_path: Path, seeded: tuple[float, list[Part]]
) -> None:
    _, parts = seeded
    conn = _open(tmp_path / "m.db")
    deferred = database.Deferred(max_age_s=HELD)
    tools = [r for part in parts for r in part.get("tool_execution", ())]
    newest_ts = max(r[0] for r in tools)
    recent = [r for r in tools if r[0] == newest_ts][:1]
    old = [(recent[0][0] - 10 * 86_400_000, *recent[0][1:])]
    database.insert_rows(conn, [{"tool_execution": tools}], (), deferred)
    # An old (late) event last: the highest id of the table, deleted by retention below.
    database.insert_rows(conn, [{"tool_execution": old}], (), deferred)
    top = conn.execute("SELECT max(id) FROM tool_metrics").fetchone()[0]
    deleted = database.delete_expired_chunk(conn, "tool_metrics", old[0][0] + 1, 1000, deferred)
    assert deleted == 1
    counted = len(tools) + 1
    assert _hour_counts(conn)["tools"] == counted  # the deleted row stays counted
    assert sqlite_rollups.marks(conn)["tool_metrics"] == top - 1
    # SQLite gives the deleted row's id to the next row: it is above the mark, so it is folded.
    database.insert_rows(conn, [{"tool_execution": recent}], (), deferred)
    assert conn.execute("SELECT max(id) FROM tool_metrics").fetchone()[0] == top
    deferred.catch_up(conn)
    assert _hour_counts(conn)["tools"] == counted + 1


def test_compaction_folds_first(tmp_path: Path, seeded: tuple[float, list[Part]]) -> None:
    now, parts = seeded
    conn, reference = _open(tmp_path / "m.db"), _open(tmp_path / "r.db")
    week_ago = (int(now * 1000) - 7 * rollups.DAY_MS) // rollups.DAY_MS * rollups.DAY_MS
    deferred = database.Deferred(max_age_s=HELD)
    for db in (conn, reference):
        db.execute("UPDATE rollup_watermark SET until_ms = ?", (week_ago,))
    database.insert_rows(conn, parts, (), deferred)
    database.insert_rows(reference, parts)
    assert sqlite_rollups.compact(conn, int(now * 1000), deferred.pending) == 7
    assert sqlite_rollups.compact(reference, int(now * 1000)) == 7
    assert sum(_behind(conn).values()) == 0
    assert _same(rollup_rows(conn), rollup_rows(reference))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["mine", "other", "fold", "late"]), st.integers(1, 6)),
        min_size=1,
        max_size=8,
    )
)
def test_any_mix_of_writers_and_folds_answers_as_folding_every_commit(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int]]
) -> None:
    now, parts = _seed()
    where = tmp_path_factory.mktemp("mix")
    mine, other, reference = _open(where / "m.db"), _open(where / "m.db"), _open(where / "r.db")
    deferred = database.Deferred(max_age_s=HELD)
    given_parts = itertools.cycle(parts)
    span = {"since": f"{now - 4 * 86_400:.3f}", "until": f"{now:.3f}", "limit": "1000"}
    for action, n in steps:
        chunk = [next(given_parts) for _ in range(n)]
        if action == "mine":
            database.insert_rows(mine, chunk, (), deferred)
        elif action == "other":
            database.insert_rows(other, chunk)
        elif action == "late":  # a late event, before the day watermark: day tables too
            late = [
                {k: [(r[0] - 3 * rollups.DAY_MS, *r[1:]) for r in rows] for k, rows in p.items()}
                for p in chunk
            ]
            chunk = late
            database.insert_rows(mine, late, (), deferred)
        else:
            deferred.catch_up(mine)
            chunk = []
        if chunk:
            database.insert_rows(reference, chunk)
        for view in ("summary", "tools", "clients"):
            query = span if view != "summary" else {k: span[k] for k in ("since", "until")}
            got, want = run_view(mine, view, query), run_view(reference, view, query)
            got.pop("source"), want.pop("source")
            assert _close(got, want), (view, steps, got, want)
    deferred.catch_up(mine)
    assert _same(rollup_rows(mine), rollup_rows(reference))
    for conn in (mine, other, reference):
        conn.close()


@pytest.mark.sqlite_only("PostgreSQL maintains its rollups in every commit")
def test_a_killed_service_s_unfolded_rows_are_folded_when_it_starts_again(
    service: ServiceProcess,
) -> None:
    """kill -9 while rows wait to be folded: the next start reads them back from the raw
    table; nothing is missing from the rollups and nothing is counted twice."""
    service.env["METRICS_ROLLUP_FOLD_INTERVAL_S"] = "60"
    service.start()
    events = [
        {
            "type": "tool_execution",
            "duration_ms": 10 + i,
            "dimensions": {"method": "tools/call", "tool_name": f"t{i % 3}", "success": True},
        }
        for i in range(30)
    ]
    with httpx.Client(base_url=service.url, headers={"X-API-Key": INGEST_KEY}) as client:
        for i in range(0, 30, 10):
            r = client.post("/metrics", json={"service": "svc", "metrics": events[i : i + 10]})
            assert r.status_code == 200, r.text
        summary = client.get("/analytics/summary", headers={"X-API-Key": ADMIN_KEY})
        assert summary.json()["calls"] == 30, summary.text
    with sqlite3.connect(service.db_path) as conn:
        assert _behind(conn)["tool_metrics"] == 30
    service.kill9()
    service.start()
    with sqlite3.connect(service.db_path) as conn:
        assert _behind(conn)["tool_metrics"] == 0
        assert _hour_counts(conn)["tools"] == 30
    with httpx.Client(base_url=service.url, headers={"X-API-Key": ADMIN_KEY}) as client:
        summary = client.get("/analytics/summary")
        assert summary.json()["calls"] == 30, summary.text
    assert "folded 30 raw rows into the rollups" in service.log()
