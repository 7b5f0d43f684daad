"""The storage seam (issue 15 §1): nothing outside ``metrics_service/storage/`` talks to a
database driver, one column registry drives validation, storage, rollups and telemetry (a typed
column added there alone is validated, stored, shown and rolled up), ``METRICS_DATABASE_URL``
picks the backend and never prints a password, and the SQLite backend keeps the contract
(errors as ``StorageError``, keys rotated in one transaction, readiness through aiosqlite)."""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, auth, create_app, telemetry
from metrics_service.errors import ConfigError, StorageError
from metrics_service.settings import load_settings
from metrics_service.storage import backend, rollups, schema
from metrics_service.storage.sqlite import INSERT_SQL, SqliteBackend, migrations
from metrics_service.validation import Validator
from tests._helpers import ADMIN_KEY, INGEST_KEY, ROOT, cli, db_rows, payload, tool_event

PACKAGE = ROOT / "metrics_service"
DRIVERS = {"sqlite3", "aiosqlite", "asyncpg", "psycopg", "psycopg2", "psycopg_pool", "sqlalchemy"}
H = {"X-API-Key": INGEST_KEY}


def driver_imports(source: str) -> list[str]:
    """The database drivers a module imports, anywhere in it (also inside functions)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in DRIVERS]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in DRIVERS
        ):
            found.append(node.module)
    return found


def test_the_scanner_finds_a_driver_import_wherever_it_is() -> None:
    assert driver_imports("import os\nfrom pathlib import Path\n") == []
    assert driver_imports("import sqlite3") == ["sqlite3"]
    assert driver_imports("def f():\n    from asyncpg import pool\n") == ["asyncpg"]
    assert driver_imports("import json, aiosqlite as a") == ["aiosqlite"]


def test_nothing_outside_storage_imports_a_database_driver() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "storage":
            continue
        found = driver_imports(path.read_text())
        if found:
            offenders[str(relative)] = found
    assert offenders == {}, "database drivers belong behind metrics_service/storage/"
    # The scan saw the modules that used to import sqlite3.
    scanned = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert {"api.py", "app.py", "cli.py", "analytics/queries.py"} <= scanned


# -- the column registry -------------------------------------------------------------------------


def _every_dimension(kind: str) -> tuple[dict[str, object], dict[str, object]]:
    """A value for every typed column of ``kind`` (dimensions, metadata)."""
    samples: dict[str, object] = {
        "str": "s",
        "code": "E1",
        "bool": True,
        "count": 7,
        "count_na": 3,
        "ms": 1.5,
    }
    family = schema.FAMILY[kind]
    dims = {c.name: samples[c.kind] for c in family.dimensions}
    if kind == "tool_execution":
        dims["method"] = "tools/call"
    meta = {c.name: samples[c.kind] for c in family.metadata}
    return dims, meta


def test_rows_inserts_tables_rollups_and_telemetry_follow_the_column_registry(
    tmp_path: Path,
) -> None:
    validator = Validator(Settings(db_path=tmp_path / "m.db"))
    conn, _ = migrations_applied(tmp_path / "m.db")
    for family in schema.FAMILIES:
        dims, meta = _every_dimension(family.kind)
        body = {
            "service": "svc",
            "version": "1",
            "metrics": [
                {
                    "type": family.kind,
                    "value": 2,
                    "duration_ms": 5,
                    "dimensions": dims,
                    "metadata": meta,
                }
            ],
        }
        batch = validator.decode(json.dumps(body).encode())
        assert not batch.rejections, batch.rejections
        (row,) = batch.rows[family.kind]
        # Validation builds the registry's layout: every value where the registry says.
        assert len(row) == len(family.columns)
        positions = family.positions
        assert row[positions["service"]] == "svc" and row[schema.VALUE] == 2
        for column in family.dimensions:
            expected = 1 if column.kind == "bool" else dims[column.name]
            assert row[positions[column.name]] == expected, (family.kind, column.name)
        for column in family.metadata:
            assert row[positions[column.name]] == meta[column.name], (family.kind, column.name)
        # Inserts name the registry's columns in its order.
        sql = INSERT_SQL[family.kind]
        assert sql[sql.index("(") + 1 : sql.index(")")].split(", ") == list(family.names)
        # The migrated table has exactly these columns (plus the id and virtual aliases), with
        # the registry's types and NOT NULL where it says.
        stored = {
            name: (kind, bool(notnull), hidden)
            for _, name, kind, notnull, _, _, hidden in conn.execute(
                f"PRAGMA table_xinfo({family.table})"
            )
            if name != "id"
        }
        plain = {n: v[:2] for n, v in stored.items() if v[2] == 0}
        assert plain == {c.name: (c.sql_type.upper(), not c.nullable) for c in family.columns}
        # Telemetry and the rollups read by the same positions.
        assert telemetry._COL[family.kind] == positions
    for cube in rollups.CUBES:
        assert cube.positions == schema.FAMILY[cube.kind].positions
        assert rollups.RAW_TABLE[cube.kind] == schema.TABLE_OF_TYPE[cube.kind]
    conn.close()


def migrations_applied(path: Path, upto: int | None = None) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    wanted = [m for m in migrations.MIGRATIONS if upto is None or m[0] <= upto]
    for version, _, statements in wanted:
        for statement in statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'x', 0)",
            (version,),
        )
    return conn, wanted[-1][0] if wanted else 0


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    try:
        return {r[1] for r in conn.execute(f"PRAGMA table_xinfo({table})") if r[6] == 0}
    except sqlite3.Error:
        return set()


def test_each_migration_adds_exactly_the_typed_columns_the_registry_dates_to_it(
    tmp_path: Path,
) -> None:
    for version in range(1, migrations.LATEST_VERSION + 1):
        before, _ = migrations_applied(tmp_path / f"{version}-before.db", version - 1)
        after, _ = migrations_applied(tmp_path / f"{version}-after.db", version)
        for family in schema.FAMILIES:
            typed = {c.name for c in (*family.dimensions, *family.metadata)}
            new = (_columns(after, family.table) - _columns(before, family.table)) & typed
            if not _columns(before, family.table):
                continue  # the table itself is new in this version
            dated = {c.name for t, c in schema.added_in(version) if t == family.table}
            assert new == dated, (version, family.table)
        before.close()
        after.close()


def test_the_metrics_view_is_built_from_the_registry() -> None:
    # Migration 7's view, written out, is exactly the one the registry generates.
    assert migrations.MIGRATIONS[6][0] == 7
    assert migrations.MIGRATIONS[6][2][-1] == migrations.registry_view()


#: The one change: a line in the column registry.
NEW_COLUMN = '            Column("model_name", "str", since=9),\n'
ANCHOR = '            Column("error_type", "str", since=_S7),\n'


def test_a_typed_column_added_to_the_registry_alone_is_validated_stored_shown_and_rolled_up(
    tmp_path: Path,
) -> None:
    """A copy of the package whose only difference is one ``Column`` line in
    ``storage/schema.py``: its migration is generated, validation checks the new dimension, the
    row stores it in its column, the ``metrics`` view shows it, and the rollups (reading by
    position) still count the calls."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "metrics_service", ignore=shutil.ignore_patterns("__pycache__"))
    registry = copy / "metrics_service" / "storage" / "schema.py"
    text = registry.read_text()
    assert text.count(ANCHOR) == 1
    registry.write_text(text.replace(ANCHOR, ANCHOR + NEW_COLUMN))
    script = textwrap.dedent(
        f"""
        import json, sqlite3
        from fastapi.testclient import TestClient
        from metrics_service import Settings, create_app
        from metrics_service.storage.sqlite import migrations

        assert migrations.__file__.startswith({str(copy)!r}), migrations.__file__
        assert migrations.LATEST_VERSION == 9, migrations.LATEST_VERSION
        settings = Settings(db_path={str(tmp_path / "m.db")!r}, admin_api_key={ADMIN_KEY!r})
        tool = json.loads({json.dumps(tool_event("search"))!r})
        tool["dimensions"]["model_name"] = "m-1"
        bad = json.loads(json.dumps(tool))
        bad["dimensions"]["model_name"] = 5
        with TestClient(create_app(settings)) as c:
            r = c.post("/metrics", json={{"service": "svc", "version": "1",
                                          "metrics": [tool, tool, bad]}},
                       headers={{"X-API-Key": {INGEST_KEY!r}}})
            assert r.status_code == 200, r.text
            assert r.json()["accepted"] == 2, r.text
            assert r.json()["errors"][0]["field"] == "metrics[2].dimensions.model_name", r.text
            summary = c.get("/analytics/summary", headers={{"X-API-Key": {ADMIN_KEY!r}}})
            assert summary.json()["calls"] == 2, summary.text
        conn = sqlite3.connect(settings.db_path)
        assert conn.execute("SELECT model_name FROM tool_metrics").fetchall() == [("m-1",)] * 2
        assert conn.execute("PRAGMA user_version").fetchone() == (9,)
        view = conn.execute(
            "SELECT json_extract(dimensions, '$.model_name'), json_extract(dimensions, "
            "'$.tool_name') FROM metrics WHERE type = 'tool_execution'"
        ).fetchall()
        assert view == [("m-1", "search")] * 2, view
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "METRICS_API_KEY_SVC": INGEST_KEY,
            "OTEL_PROMETHEUS_PORT": "0",
        },
        cwd=copy,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# -- METRICS_DATABASE_URL ------------------------------------------------------------------------


def test_unset_or_a_sqlite_url_keeps_sqlite(tmp_path: Path, keyed_env: None) -> None:
    assert backend.parse_database_url(None) is None
    assert backend.parse_database_url("  ") is None
    assert isinstance(backend.create_backend(Settings(db_path=tmp_path / "m.db")), SqliteBackend)
    target = tmp_path / "elsewhere" / "via-url.db"
    settings = load_settings(database_url=f"sqlite:///{target}", db_path=tmp_path / "unused.db")
    with TestClient(create_app(settings)) as c:
        assert c.post("/metrics", json=payload(), headers=H).status_code == 200
    assert db_rows(target, "SELECT value FROM custom_metrics") == [(1.0,)]
    assert not (tmp_path / "unused.db").exists()


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("mysql://app:s3cret-pw@db:3306/metrics", "unsupported scheme"),
        ("postgresql://app:s3cret-pw@db:notaport/metrics", "cannot parse"),
        ("postgresql://app:s3cret-pw@db:5432", "names no database"),
        ("postgresql://app:s3cret-pw@/metrics", "names no host"),
        ("sqlite://host/file.db", "not a SQLite URL"),
        ("just-a-path.db", "unsupported scheme"),
    ],
)
def test_a_bad_url_fails_naming_the_variable_and_never_the_password(url: str, rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url=url)
    message = str(caught.value)
    assert "METRICS_DATABASE_URL" in message and rule in message, message
    assert "s3cret-pw" not in message, message


def test_the_cli_refuses_a_bad_url_with_exit_2_and_no_password(tmp_path: Path) -> None:
    done = cli(
        tmp_path / "m.db",
        "db",
        "stats",
        env={"METRICS_DATABASE_URL": "redis://user:s3cret-pw@localhost:6379/0"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "METRICS_DATABASE_URL" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert "***" in done.stderr  # the URL is shown, its password masked


def test_a_postgresql_url_that_cannot_be_used_fails_start_up_naming_the_variable(
    tmp_path: Path, keyed_env: None
) -> None:
    # Port 1 on loopback: nothing listens there (and without the PostgreSQL backend installed,
    # the message says so); either way start-up stops, naming the variable, no password.
    settings = load_settings(
        database_url="postgresql://app:s3cret-pw@127.0.0.1:1/metrics", db_path=tmp_path / "m.db"
    )
    with pytest.raises((ConfigError, StorageError)) as caught, TestClient(create_app(settings)):
        pass
    message = str(caught.value)
    assert "METRICS_DATABASE_URL" in message and "s3cret-pw" not in message, message
    assert not (tmp_path / "m.db").exists()  # nothing fell back to SQLite


def test_redact_masks_only_the_password() -> None:
    assert backend.redact("postgresql://app:pw@db:5432/m?sslmode=require") == (
        "postgresql://app:***@db:5432/m?sslmode=require"
    )
    assert backend.redact("postgresql://db/m") == "postgresql://db/m"


# -- the SQLite backend's contract -------------------------------------------------------------


async def _opened(path: Path, **kwargs: object) -> SqliteBackend:
    storage = SqliteBackend(Settings(db_path=path, **kwargs))  # type: ignore[arg-type]
    await storage.open()
    return storage


def test_the_sqlite_backend_implements_the_protocol(tmp_path: Path) -> None:
    assert isinstance(SqliteBackend(Settings(db_path=tmp_path / "m.db")), backend.StorageBackend)


def test_a_locked_database_crosses_the_seam_as_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "m.db"

    async def run() -> None:
        storage = await _opened(path, sqlite_busy_timeout_ms=100)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            assert await storage.writable() is False
            with pytest.raises(StorageError, match="creating a key failed: database is locked"):
                await auth.create_key(storage, service="svc")
            # Readers are not blocked in WAL mode: a view still answers.
            cube, states, source = await storage.analytics(
                lambda reader: reader.aggregate(_query())
            )
            assert (cube.kind, states, source) == ("tool_execution", {}, "rollup")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await storage.writable() is True
        await storage.close()
        with pytest.raises(StorageError, match="closed"):
            await storage.list_keys()
        await storage.close()  # idempotent

    asyncio.run(run())


def _query() -> rollups.Query:
    return rollups.Query("tool_execution", 0, 3_600_000, ("tool_name",))


def test_a_rotated_key_is_replaced_in_one_transaction(tmp_path: Path) -> None:
    async def run() -> None:
        storage = await _opened(tmp_path / "m.db")
        try:
            secret, old = await auth.create_key(
                storage, service="svc", aliases=("svc-b",), rate_limit_per_min=7
            )
            rotated = await auth.rotate_key(storage, old.id)
            assert rotated is not None
            new_secret, revoked, new = rotated
            assert revoked.id == old.id and revoked.revoked_at is not None
            assert (new.service, new.role, new.aliases, new.rate_limit_per_min) == (
                "svc",
                "ingest",
                ("svc-b",),
                7,
            )
            assert new.key_hash == auth.hash_key(new_secret) != auth.hash_key(secret)
            active = await storage.list_keys(active_only=True)
            assert [k.id for k in active] == [new.id]
            assert await auth.rotate_key(storage, old.id) is None  # revoked: nothing to rotate
        finally:
            await storage.close()

    asyncio.run(run())


def test_keys_rotate_on_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    created = cli(db, "keys", "create", "--service", "svc")
    assert created.returncode == 0, created.stderr
    done = cli(db, "keys", "rotate", "1")
    assert done.returncode == 0, done.stderr
    assert "Key 1 revoked and replaced by key 2 (ingest, service svc)" in done.stdout
    secret = next(ln.strip() for ln in done.stdout.splitlines() if ln.strip().startswith("mcpm_"))
    assert db_rows(db, "SELECT id FROM api_keys WHERE revoked_at IS NULL") == [(2,)]
    assert db_rows(db, "SELECT key_hash FROM api_keys WHERE id = 2") == [(auth.hash_key(secret),)]
    again = cli(db, "keys", "rotate", "1")
    assert again.returncode == 1 and "no active key with id 1" in again.stderr
