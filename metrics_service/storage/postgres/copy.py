"""Copy a SQLite database's history into an empty PostgreSQL database (``db copy-to-postgres``).

The SQLite file is first brought to the latest SQLite schema (its own migrations), then read in
id order, a chunk at a time, and written with ``COPY``: every raw row with its id (the sequences
then continue after the highest), the rollup tables as they are (the same cubes and states, so
no answer changes and nothing is re-aggregated) with their day watermark and fold marks (rows
the SQLite service had not folded yet are folded by PostgreSQL's first fold), the API keys (hashes
only, revoked ones too: a revoked secret stays refused), the retention policies and the live
idempotency keys. Everything is one PostgreSQL transaction: an interrupted copy leaves the
target empty, and a target that already holds metrics or keys is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from metrics_service.errors import StorageError
from metrics_service.storage import rollups
from metrics_service.storage.postgres import rollups as pg_rollups
from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.postgres.backend import Backend
from metrics_service.storage.postgres.migrations import TABLE_OF_TYPE, TABLES, row_columns
from metrics_service.storage.rollups import DAY_MS
from metrics_service.storage.sqlite import database
from metrics_service.storage.sqlite import rollups as sqlite_rollups

CHUNK_ROWS = 20_000
_KEY_COLUMNS = (
    "id",
    "service",
    "role",
    "key_hash",
    "key_prefix",
    "rate_limit_per_min",
    "source",
    "description",
    "created_at",
    "revoked_at",
    "service_aliases",
)
_IDEMPOTENCY_COLUMNS = ("service", "key", "fingerprint", "status", "response", "committed_at")


async def copy_from_sqlite(path: Path, backend: Backend) -> dict[str, int]:
    """Copy ``path`` into ``backend`` (opened, empty); rows copied per table."""
    conn, _ = database.open_database(path)
    try:
        async with backend._conn("copying into PostgreSQL") as pg:
            return await _copy(conn, pg, backend)
    finally:
        conn.close()


async def _copy(lite: sqlite3.Connection, pg: Conn, backend: Backend) -> dict[str, int]:
    copied: dict[str, int] = {}
    have = 0
    for table in (*TABLES, "api_keys"):
        have += int(await pg.fetchval(f"SELECT count(*) FROM {table}"))
    if have:
        raise StorageError(
            f"the PostgreSQL database already holds {have} rows of metrics or keys:"
            " copy into an empty one"
        )
    # Every day partition the history needs, before the transaction that fills them.
    wanted: set[tuple[str, int]] = set()
    for table in TABLES:
        for (day,) in lite.execute(f"SELECT DISTINCT ts - ts % {DAY_MS} FROM {table}"):
            wanted.add((table, int(day)))
    await backend.partitions.ensure(pg, wanted)
    folded = sqlite_rollups.marks(lite)
    async with pg.transaction():
        # As every insert: a replica already running on this database folds these rows only
        # once the copy has committed its marks (its barrier waits for this lock).
        await pg.execute("SELECT pg_advisory_xact_lock_shared($1)", pg_rollups.WATERMARK_LOCK)
        for kind, table in TABLE_OF_TYPE.items():
            columns = ["id", *row_columns(kind)]
            copied[table] = await _chunks(lite, pg, table, columns, "id")
            await pg.execute(
                f"SELECT setval('{table}_id_seq', coalesce((SELECT max(id) FROM {table}), 0) + 1,"
                " false)"
            )
            # The rollups are copied as they are, so their marks too: the rows the SQLite
            # service had not folded yet are folded by PostgreSQL's first fold. (A family
            # without cubes has no SQLite mark: nothing of it is folded.)
            await pg.execute(
                "UPDATE rollup_folded SET until_id = coalesce($2::bigint,"
                f" (SELECT coalesce(max(id), 0) FROM {table})) WHERE table_name = $1",
                table,
                folded.get(table),
            )
        for cube in rollups.CUBES:
            for level in cube.levels:
                table = cube.table(level)
                columns = ["bucket", *cube.dims, *cube.state_columns]
                copied[table] = await _chunks(lite, pg, table, columns, None)
        (watermark,) = lite.execute(
            "SELECT until_ms FROM rollup_watermark WHERE name = 'day'"
        ).fetchone()
        await pg.execute("UPDATE rollup_watermark SET until_ms = $1 WHERE name = 'day'", watermark)
        copied["api_keys"] = await _chunks(lite, pg, "api_keys", list(_KEY_COLUMNS), "id")
        await pg.execute(
            "SELECT setval(pg_get_serial_sequence('api_keys', 'id'),"
            " coalesce((SELECT max(id) FROM api_keys), 0) + 1, false)"
        )
        copied["idempotency_keys"] = await _chunks(
            lite, pg, "idempotency_keys", list(_IDEMPOTENCY_COLUMNS), None
        )
        for table, days, enabled, updated in lite.execute(
            "SELECT table_name, retention_days, enabled, updated_at FROM retention_policies"
        ):
            await pg.execute(
                "UPDATE retention_policies SET retention_days = $1, enabled = $2,"
                " updated_at = $3 WHERE table_name = $4",
                days,
                enabled,
                updated,
                table,
            )
    return copied


async def _chunks(
    lite: sqlite3.Connection, pg: Conn, table: str, columns: list[str], order: str | None
) -> int:
    """COPY ``columns`` of SQLite ``table`` into the same PostgreSQL table, in chunks."""
    cursor = lite.execute(
        f"SELECT {', '.join(columns)} FROM {table}" + (f" ORDER BY {order}" if order else "")
    )
    total = 0
    while True:
        rows: list[tuple[Any, ...]] = cursor.fetchmany(CHUNK_ROWS)
        if not rows:
            return total
        if table == "idempotency_keys":
            rows = [(*r[:4], bytes(r[4]), r[5]) for r in rows]
        await pg.copy_records_to_table(table, records=rows, columns=columns)
        total += len(rows)
