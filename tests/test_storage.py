"""Storage: migrations on existing databases, atomic and idempotent; commits retried without
duplicates while another process holds the database."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from metrics_service import storage
from metrics_service.errors import StorageError
from metrics_service.storage.sqlite import migrations
from tests._helpers import INGEST_KEY, db_rows

H = {"X-API-Key": INGEST_KEY}


def test_migrations_are_idempotent_and_keep_existing_data(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    conn, applied = storage.open_database(db)
    assert applied == [v for v, _, _ in migrations.MIGRATIONS]
    conn.execute(
        "INSERT INTO custom_metrics (ts, received_at, service, service_version, value)"
        " VALUES (1, 1, 's', 'v', 5)"
    )
    conn.close()
    conn, applied = storage.open_database(db)
    assert applied == []
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.LATEST_VERSION
    assert conn.execute("SELECT value FROM metrics").fetchall() == [(5.0,)]
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
        migrations.MIGRATIONS
    )
    conn.close()


def test_migrations_apply_to_a_database_that_already_holds_other_tables(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE unrelated (x)")
        other.execute("INSERT INTO unrelated VALUES (42)")
    conn, applied = storage.open_database(db)
    assert applied == [v for v, _, _ in migrations.MIGRATIONS]
    assert conn.execute("SELECT x FROM unrelated").fetchall() == [(42,)]
    conn.close()


def test_a_failing_migration_is_rolled_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "m.db"
    storage.open_database(db)[0].close()
    broken = (99, "broken", ["CREATE TABLE half_done (x)", "THIS IS NOT SQL"])
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.raises(StorageError):
        storage.open_database(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.LATEST_VERSION
    assert conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'"
    ).fetchone() == (0,)
    conn.close()
    fixed = (99, "fixed", ["CREATE TABLE half_done (x)"])
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS[:-1], fixed])
    conn, applied = storage.open_database(db)
    assert applied == [99]
    conn.close()


def test_concurrent_starts_apply_each_migration_once(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    results: list[list[int]] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        conn, applied = storage.open_database(db)
        results.append(applied)
        conn.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each version runs in its own transaction, so two starters may share the work (one applies
    # version 1, another the rest); what matters is that every version is applied exactly once.
    assert len(results) == 6
    assert sorted(v for applied in results for v in applied) == [
        v for v, _, _ in migrations.MIGRATIONS
    ]
    assert db_rows(db, "SELECT count(*) FROM schema_migrations") == [(len(migrations.MIGRATIONS),)]


def test_none_binds_as_null_through_the_registered_adapter(tmp_path: Path) -> None:
    conn, _ = storage.open_database(tmp_path / "m.db")
    assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)] is not None
    conn.execute("CREATE TEMP TABLE t (a, b, c, d)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?)", [(None, 1, 1.5, "x"), (None, None, None, None)]
    )
    assert conn.execute(
        "SELECT typeof(a), typeof(b), typeof(c), typeof(d) FROM t ORDER BY rowid"
    ).fetchall() == [
        ("null", "integer", "real", "text"),
        ("null", "null", "null", "null"),
    ]
    assert conn.execute("SELECT count(*) FROM t WHERE a IS NULL").fetchone() == (2,)


@pytest.mark.parametrize("n", [3, 8, 9, 31, 32, 33, 40, 63, 64, 95, 100])
def test_rows_store_exactly_as_given_whichever_columns_a_commit_sets(
    tmp_path: Path, n: int
) -> None:
    """A commit binds only the columns some of its rows set (at 8 rows of a type or more), 32
    rows per statement and the rest in smaller ones: the stored rows equal the given tuples, in
    order, a column set by one row only included, NULL elsewhere."""
    from metrics_service.storage import schema
    from metrics_service.storage.sqlite import database

    conn, _ = storage.open_database(tmp_path / "m.db")
    names = schema.FAMILY["tool_execution"].names
    width = len(names)
    rows = []
    for i in range(n):
        row: list[object] = [None] * width
        row[names.index("ts")] = 1_800_000_000_000 + i
        row[names.index("received_at")] = 1_800_000_000_500
        row[names.index("service")] = "svc"
        row[names.index("service_version")] = ""
        row[names.index("value")] = 1.0
        row[names.index("method")] = "tools/call"
        row[names.index("tool_name")] = f"t{i % 3}"
        row[names.index("success")] = i % 2
        if i == n - 1:  # set by the last row only
            row[names.index("duration_ms")] = 12.5
            row[names.index("client_name")] = "cli"
        rows.append(tuple(row))
    half = n // 2
    assert (
        database.insert_rows(
            conn, [{"tool_execution": rows[:half]}, {"tool_execution": rows[half:]}]
        )
        == n
    )
    stored = conn.execute(f"SELECT {', '.join(names)} FROM tool_metrics ORDER BY id").fetchall()
    assert stored == rows
