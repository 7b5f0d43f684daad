"""The SQLite backend: today's embedded default, needing no set-up.

Three connections to one file in WAL mode:

- the **writer**: one ``sqlite3`` connection on a dedicated thread, the only one that writes
  (migrations, the group commits of ingest, keys, retention, compaction). It stays a thread of
  its own rather than going through ``aiosqlite``: a commit is a whole function of the
  connection (claims, inserts, rollup upserts) run in one hop, where ``aiosqlite`` would take a
  hop per statement (docs/performance.md, "SQLite writer": the measured cost);
- the **reader**: an ``aiosqlite`` connection (``query_only``) for analytics, the admin reads,
  the key reload and idempotency lookups. Views run inside one read transaction; reads share
  the connection one at a time, as they shared the reader thread before;
- the **probe**: an ``aiosqlite`` connection with a short busy timeout, for readiness (taking the
  write lock and releasing it proves the file is writable without occupying the writer).

Every ``sqlite3.Error`` becomes ``StorageError`` here; nothing of ``sqlite3`` leaves the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from metrics_service.errors import StorageError
from metrics_service.storage import rollups as shared
from metrics_service.storage.backend import Aggregate, KeyRecord, Part, Policy, Reader
from metrics_service.storage.schema import TABLES
from metrics_service.storage.sqlite import admin, database, keys, reference
from metrics_service.storage.sqlite import idempotency as idem
from metrics_service.storage.sqlite import rollups as sql_rollups
from metrics_service.storage.sqlite.database import (
    INSERT_SQL,
    TABLE_OF_TYPE,
    connect,
    insert_rows,
    open_database,
)
from metrics_service.storage.sqlite.migrations import LATEST_VERSION
from metrics_service.storage.sqlite.transaction import write_transaction

if TYPE_CHECKING:
    from metrics_service.idempotency import Claim, Stored
    from metrics_service.settings import Settings
    from metrics_service.storage.rollups import Query

__all__ = [
    "INSERT_SQL",
    "LATEST_VERSION",
    "TABLES",
    "TABLE_OF_TYPE",
    "SqliteBackend",
    "SyncReader",
    "connect",
    "insert_rows",
    "open_database",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: How long the readiness probe waits for SQLite's write lock.
PROBE_BUSY_TIMEOUT_MS = 200


def import_reference_rows(conn: sqlite3.Connection, settings: Settings) -> None:
    """Finish importing an adopted MCP Gateway Registry database, if there is one."""
    from metrics_service.validation import Validator

    try:
        reference.import_rows(conn, Validator(settings))
    except sqlite3.Error as exc:
        raise StorageError(f"cannot import the reference database's rows: {exc}") from exc


class _Writer:
    """The one connection that writes, on its own thread; ``run`` executes a function of it
    there."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.applied_migrations: list[int] = []
        #: The rows committed and not yet folded into the rollups (``rollups.catch_up``).
        self.deferred = database.Deferred(max_age_s=settings.rollup_fold_interval_s)

    async def run(self, fn: Callable[[sqlite3.Connection], T], what: str = "write") -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, what)

    def _call(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        if self._conn is None:
            raise StorageError("the database is closed")
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageError(f"{what} failed: {exc}") from exc

    def _open(self) -> None:
        self._conn, self.applied_migrations = open_database(
            self._settings.db_path,
            synchronous=self._settings.sqlite_synchronous.value,
            busy_timeout_ms=self._settings.sqlite_busy_timeout_ms,
        )
        try:
            import_reference_rows(self._conn, self._settings)
            # Rows a previous process committed and did not fold (it was killed): read back.
            folded = database.Deferred().catch_up(self._conn)
            if folded:
                log.info("folded %d raw rows into the rollups", folded)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(StorageError):
                self.deferred.catch_up(self._conn)
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._conn.close()
            self._conn = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)


class _AioReader:
    """``Reader`` over an ``aiosqlite`` connection: the shared rollup logic, SQLite's SQL, one
    hop per statement."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def aggregate(self, q: Query) -> Aggregate:
        # Called inside the read transaction of ``SqliteBackend.analytics``: the marks, the
        # rollups and the raw rows above the marks are of the same commit.
        shape, source = shared.query_shape(q)
        watermark = None
        if source == "rollup":
            watermark = int((await admin.one(self._conn, sql_rollups._WATERMARK_SQL))[0])
        segments, source = shared.query_segments(q, source, shape, watermark)
        folded: dict[str, int] = {}
        if source == "rollup":
            folded = sql_rollups.marks_of(await self._conn.execute_fetchall(sql_rollups._MARKS_SQL))
        out: dict[tuple[Any, ...], list[Any]] = {}
        for sql, params, keylen in sql_rollups.read_plan(shape, q, segments, folded):
            shared.fold(shape, await self._conn.execute_fetchall(sql, params), keylen, out)
        shared.finish(shape, out)
        return shape.cube, out, source


class SyncReader:
    """``Reader`` over a plain ``sqlite3`` connection, for tools and tests that hold one (the
    service reads through ``aiosqlite``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def aggregate(self, q: Query) -> Aggregate:
        return sql_rollups.aggregate(self._conn, q)


class SqliteBackend:
    """``StorageBackend`` on one SQLite file (``SQLITE_DB_PATH``)."""

    name = "sqlite"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.path: Path = settings.db_path
        self.description = str(settings.db_path.resolve())
        self._writer = _Writer(settings)
        self._reader: aiosqlite.Connection | None = None
        self._probe: aiosqlite.Connection | None = None
        self._read_lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        self._catch_up: asyncio.Task[None] | None = None
        self.applied_migrations: list[int] = []
        # Other processes' key changes are seen by the periodic reload only.
        self.on_keys_changed: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def _connect(self, busy_timeout_ms: int, query_only: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(
            self.path, isolation_level=None, timeout=busy_timeout_ms / 1000
        )
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await conn.execute("PRAGMA temp_store = MEMORY")
            if query_only:
                await conn.execute("PRAGMA query_only = ON")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        await self._writer.open()
        self.applied_migrations = self._writer.applied_migrations
        busy = self._settings.sqlite_busy_timeout_ms
        try:
            self._reader = await self._connect(busy, query_only=True)
            self._probe = await self._connect(min(busy, PROBE_BUSY_TIMEOUT_MS), query_only=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._catch_up is not None:  # the writer's close folds what is pending
            self._catch_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._catch_up
        for name in ("_probe", "_reader"):
            conn: aiosqlite.Connection | None = getattr(self, name)
            setattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()
        await self._writer.close()

    @contextlib.asynccontextmanager
    async def _read(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """The reader, one user at a time; ``sqlite3`` errors become ``StorageError``."""
        async with self._read_lock:
            conn = self._reader
            if conn is None:
                raise StorageError("the database is closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StorageError(f"{what} failed: {exc}") from exc
            except ValueError as exc:
                if "closed" not in str(exc):
                    raise
                raise StorageError("the database is closed") from exc

    async def writable(self) -> bool:
        probe = self._probe
        if probe is None:
            return False

        async def check() -> bool:
            async with self._probe_lock:
                # One statement list, one hop: the lock is never left held by a cancelled probe.
                await probe.executescript("BEGIN IMMEDIATE; ROLLBACK;")
                return True

        try:
            return await asyncio.shield(check())
        except (sqlite3.Error, ValueError):
            return False

    # -- ingest --------------------------------------------------------------------------------

    async def insert_batches(
        self, parts: Sequence[Part], claims: Sequence[Claim | None] = ()
    ) -> int:
        # Through the module (a benchmark times it there: bench/breakdown.py).
        deferred = self._writer.deferred
        count = await self._writer.run(
            lambda conn: database.insert_rows(conn, parts, claims, deferred), "commit"
        )
        if deferred.pending.parts and self._catch_up is None:
            self._catch_up = asyncio.create_task(self._catch_up_later(), name="rollups-catch-up")
        return count

    async def _catch_up_later(self) -> None:
        """Fold the pending rows once they are due even if no commit comes to take them (a
        burst, then quiet): queries stay exact without it, but read those rows raw."""
        deferred = self._writer.deferred
        try:
            while deferred.pending.parts:
                wait = deferred.max_age_s - (time.monotonic() - deferred.pending.since)
                if wait > 0:
                    await asyncio.sleep(wait)
                elif not self._writer.closed:
                    await self._writer.run(deferred.catch_up, "folding into the rollups")
                else:
                    return
        except StorageError as exc:
            log.warning("folding into the rollups failed, the next commit retries: %s", exc)
        finally:
            self._catch_up = None

    async def idempotency_lookup(self, service: str, key: str, window_s: float) -> Stored | None:
        async with self._read("idempotency lookup") as conn:
            return await admin.idempotency_lookup(conn, service, key, window_s)

    # -- keys ----------------------------------------------------------------------------------

    async def list_keys(self, *, active_only: bool = False) -> list[KeyRecord]:
        async with self._read("reading keys") as conn:
            return await admin.list_keys(conn, active_only=active_only)

    async def create_key(
        self,
        *,
        service: str | None,
        role: str,
        key_hash: str,
        key_prefix: str,
        rate_limit_per_min: int | None,
        source: str,
        description: str | None = None,
        aliases: tuple[str, ...] = (),
    ) -> KeyRecord:
        return await self._writer.run(
            lambda c: keys.insert_key(
                c,
                service=service,
                role=role,
                key_hash=key_hash,
                key_prefix=key_prefix,
                rate_limit_per_min=rate_limit_per_min,
                source=source,
                description=description,
                aliases=aliases,
            ),
            "creating a key",
        )

    async def revoke_key(self, key_id: int) -> KeyRecord | None:
        return await self._writer.run(lambda c: keys.revoke_key(c, key_id), "revoking a key")

    async def rotate_key(
        self, key_id: int, *, key_hash: str, key_prefix: str, source: str
    ) -> tuple[KeyRecord, KeyRecord] | None:
        return await self._writer.run(
            lambda c: keys.rotate_key(
                c, key_id, key_hash=key_hash, key_prefix=key_prefix, source=source
            ),
            "rotating a key",
        )

    async def reconcile_env_keys(
        self, wanted: dict[tuple[str, str | None], tuple[str, str]]
    ) -> dict[str, Any]:
        return await self._writer.run(
            lambda c: keys.reconcile_env_keys(c, wanted), "reconciling environment keys"
        )

    # -- retention and rollup upkeep -----------------------------------------------------------

    async def retention_policies(self, default_days: int) -> list[Policy]:
        async with self._read("reading retention policies") as conn:
            return await admin.retention_policies(conn, default_days)

    async def set_retention_policy(
        self, tables: Sequence[str], retention_days: int | None, enabled: bool | None
    ) -> None:
        for table in tables:
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}")

        def apply(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                for table in tables:
                    database.set_retention_policy(conn, table, retention_days, enabled)

        await self._writer.run(apply, "setting a retention policy")

    async def count_expired(self, table: str, before_ms: int) -> int:
        if table in TABLES:
            fn = database.count_expired
        elif table in shared.TABLES:
            fn = sql_rollups.count_expired
        else:
            raise ValueError(f"unknown table {table!r}")
        return await self._writer.run(lambda c: fn(c, table, before_ms), "counting expired rows")

    async def delete_expired(self, table: str, before_ms: int, limit: int) -> int:
        if table in TABLES:
            deferred = self._writer.deferred
            return await self._writer.run(
                lambda c: database.delete_expired_chunk(c, table, before_ms, limit, deferred),
                "retention delete",
            )
        if table in shared.TABLES:
            return await self._writer.run(
                lambda c: sql_rollups.delete_expired_chunk(c, table, before_ms, limit),
                "retention delete",
            )
        raise ValueError(f"unknown table {table!r}")

    async def forget_idempotency_keys(self, before_ms: int, limit: int) -> int:
        return await self._writer.run(
            lambda c: idem.delete_expired_chunk(c, before_ms, limit),
            "forgetting expired idempotency keys",
        )

    async def compact_rollups(self, now_ms: int) -> int:
        deferred = self._writer.deferred

        def compact(conn: sqlite3.Connection) -> int:
            days = sql_rollups.compact(conn, now_ms, deferred.pending)
            if days:  # the first day's transaction folded them
                deferred.pending = sql_rollups.Pending()
            return days

        return await self._writer.run(compact, "compacting rollups")

    # -- reads ---------------------------------------------------------------------------------

    async def analytics(self, view: Callable[[Reader], Awaitable[T]]) -> T:
        async with self._read("analytics query") as conn:
            # One read transaction: every query of the view sees the same commits.
            await conn.execute("BEGIN")
            try:
                return await view(_AioReader(conn))
            finally:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.execute("COMMIT")

    async def stats(self) -> dict[str, Any]:
        async with self._read("db stats") as conn:
            return await admin.stats(conn, self.path)

    async def table_stats(self, default_days: int, rollup_days: int) -> dict[str, dict[str, Any]]:
        async with self._read("table statistics") as conn:
            return await admin.table_stats(conn, default_days, rollup_days)

    async def retention_preview(
        self, default_days: int, tables: Sequence[str] | None, now_s: float
    ) -> dict[str, dict[str, Any]]:
        async with self._read("retention preview") as conn:
            return await admin.retention_preview(conn, default_days, tables, now_s)

    async def database_size(self) -> dict[str, Any]:
        async with self._read("database size") as conn:
            return await admin.database_size(conn, self.path)

    # -- the MCP Gateway Registry's SQL --------------------------------------------------------

    async def reference_sql(self, enabled: bool | None = None) -> bool:
        def apply(conn: sqlite3.Connection) -> bool:
            if enabled is not None:
                reference.set_sql_columns(conn, enabled)
            return reference.sql_columns_enabled(conn)

        return await self._writer.run(apply, "switching the reference SQL columns")

    async def drop_reference(self) -> list[str]:
        def drop(conn: sqlite3.Connection) -> list[str]:
            try:
                return reference.drop_tables(conn)
            except RuntimeError as exc:
                raise StorageError(str(exc)) from None

        return await self._writer.run(drop, "dropping the reference tables")
