"""The PostgreSQL backend: N stateless replicas on one database (``METRICS_DATABASE_URL``).

One asyncpg pool per process. Each group of batches is one transaction: the idempotency claims
and a ``COPY`` of each family's rows into its partitioned raw table (or, for a small group,
one call of the ingest function); the caller acknowledges only after ``COMMIT`` returned. The
rollups are folded in every ``METRICS_ROLLUP_FOLD_INTERVAL_S`` by whichever replica gets there
first (``rollups.py`` says how this stays exact across replicas). A deadlock or serialisation
failure between replicas retries the whole transaction (nothing of it was committed). Every
driver or network error leaves as ``StorageError`` (the API answers 503 with ``Retry-After``);
the pool replaces broken connections by itself, so the service recovers when the server is
back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from metrics_service.errors import StorageError
from metrics_service.storage import rollups
from metrics_service.storage.backend import (
    ENV,
    Aggregate,
    DatabaseUrl,
    KeyRecord,
    Policy,
    cutoff_ms,
    iso_ms,
    redact,
    retention_preview_entry,
)
from metrics_service.storage.postgres import migrations
from metrics_service.storage.postgres import rollups as pg_rollups
from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.postgres.listener import KeyListener
from metrics_service.storage.postgres.migrations import TABLE_OF_TYPE, TABLES, row_columns
from metrics_service.storage.postgres.partitions import Partitions
from metrics_service.storage.postgres.partitions import name as partition_name
from metrics_service.storage.rollups import DAY_MS

if TYPE_CHECKING:
    from metrics_service.idempotency import Claim, Stored
    from metrics_service.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
#: Session-level advisory lock of the retention run (detaching needs autocommit).
RETENTION_LOCK = 0x726574656E74  # "retent"
_RETRIED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
#: (``InternalClientError``: a connection the server ended while it was idle can report it on
#: its next use, before the driver has seen it closed.)
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)
_COLUMNS = {kind: row_columns(kind) for kind in TABLE_OF_TYPE}
#: From this many rows of a family in one transaction on, COPY them (cheaper per row; fewer
#: go in the ingest function's one call: COPY takes a transaction and round trips of its own).
COPY_ROWS = 64
_BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock_shared({pg_rollups.WATERMARK_LOCK})"
#: The families in the order of the ingest function's raw-row arguments (migration 3).
_KINDS = tuple(TABLE_OF_TYPE)
_INGEST_SQL = (
    f"SELECT {migrations.INGEST_FUNCTION}("
    + ", ".join(f"${i + 1}" for i in range(2 + len(_KINDS)))
    + ")"
)
#: How many ids the raw tables have handed out above their fold marks (about the rows not
#: folded yet; no lock: the fold's first look).
_PENDING_SQL = "SELECT " + " + ".join(
    f"({pg_rollups.last_id_sql(t)} - (SELECT until_id FROM rollup_folded WHERE table_name = '{t}'))"
    for t in TABLES
)
#: A fold is due this many rows above the marks even before the interval is up (a query reads
#: them raw until then), checked every ``_FOLD_CHECK_S``.
FOLD_MAX_ROWS = 20_000
_FOLD_CHECK_S = 0.1
_KEY_FIELDS = [f.name for f in dataclasses.fields(KeyRecord)]
_KEY_SELECT = ", ".join("service_aliases" if f == "aliases" else f for f in _KEY_FIELDS)
_CLAIM_SQL = (
    "INSERT INTO idempotency_keys (service, key, fingerprint, status, response, committed_at)"
    f" VALUES ($1, $2, $3, $4, $5, $6){migrations.claim_conflict('$7')} RETURNING 1"
)
#: The ingest function could not claim every key (one is committed already, or a group holds
#: one twice): the group goes the way of one claim at a time.
_CLAIM_FALLBACK = {migrations.CLAIM_LOST, asyncpg.CardinalityViolationError.sqlstate}
_LOOKUP_SQL = (
    "SELECT fingerprint, status, response FROM idempotency_keys"
    " WHERE service = $1 AND key = $2 AND committed_at >= $3"
)


async def _reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset of a released connection, without asyncpg's default reset query (one
    more round trip per transaction, on a path that is otherwise one). asyncpg still rolls
    back an open transaction before calling this; nothing else of a session outlives its use
    here: pool connections take no SET, cursor or LISTEN, and the one session-level lock
    (retention's) is released by its holder, or its connection terminated."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _key(record: asyncpg.Record) -> KeyRecord:
    values = dict(zip(_KEY_FIELDS, tuple(record), strict=True))
    values["aliases"] = tuple(a for a in (values["aliases"] or "").split(",") if a)
    return KeyRecord(**values)


def _days(parts: Sequence[dict[str, list[tuple[Any, ...]]]]) -> set[tuple[str, int]]:
    wanted: set[tuple[str, int]] = set()
    for part in parts:
        for kind, rows in part.items():
            table = TABLE_OF_TYPE[kind]
            wanted.update((table, r[0] - r[0] % DAY_MS) for r in rows)
    return wanted


class Reader:
    """One snapshot (a read-only REPEATABLE READ transaction) for an analytics view."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def aggregate(self, q: rollups.Query) -> Aggregate:
        return await pg_rollups.aggregate(self._conn, q)


class Backend:
    """``StorageBackend`` on PostgreSQL (see ``storage/backend.py`` for the contract)."""

    name = "postgresql"

    def __init__(
        self,
        settings: Settings | None,
        url: DatabaseUrl | str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        self._url = url.url if isinstance(url, DatabaseUrl) else url
        self.description = redact(self._url)
        self._settings = settings
        self.applied_migrations: list[int] = []
        self._pool: asyncpg.Pool | None = None
        self._sizes = (min_connections, max_connections)
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self.partitions = Partitions()
        #: Set before :meth:`open` (the service does): called on the event loop whenever any
        #: process may have changed a key (``listener.py``). The CLI leaves it unset and
        #: holds no listening connection.
        self.on_keys_changed: Callable[[], None] | None = None
        self.key_listener: KeyListener | None = None
        #: Seconds between folds into the rollups (``None``: this process does not fold, as
        #: the CLI; 0: after every commit).
        self._fold_every = settings.rollup_fold_interval_s if settings is not None else None
        self._folder: asyncio.Task[None] | None = None
        #: The connection the writer holds across commits (``_commit_conn``).
        self._writer_conn: Any = None
        self._writer_busy = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._sizes[0],
                max_size=self._sizes[1],
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                # Statements are few and fixed: prepared once per connection.
                statement_cache_size=256,
                reset=_reset,
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            raise StorageError(
                f"{ENV}: cannot connect to {self.description}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            async with self._pool.acquire() as conn:
                self.applied_migrations = await migrations.apply(conn)
                await self.partitions.load(conn)
                await self.partitions.ensure_ahead(conn)
        except _DRIVER_ERRORS as exc:
            await self.close()
            raise StorageError(f"{ENV}: cannot migrate {self.description}: {exc}") from None
        if self.on_keys_changed is not None:
            self.key_listener = KeyListener(
                self._url, self.on_keys_changed, connect_timeout_s=self._connect_timeout_s
            )
            self.key_listener.start()
            # Listening before the first request is served; if it cannot yet, the listener
            # keeps trying and the periodic reload covers the gap.
            with suppress(TimeoutError):
                await asyncio.wait_for(self.key_listener.listening.wait(), self._connect_timeout_s)
        if self._fold_every:
            self._folder = asyncio.create_task(self._fold_loop(self._fold_every), name="pg-fold")

    async def close(self) -> None:
        folder, self._folder = self._folder, None
        if folder is not None:
            folder.cancel()
            with suppress(asyncio.CancelledError):
                await folder
            with suppress(StorageError, TimeoutError):  # not needed for exact answers
                await asyncio.wait_for(self.fold(wait=True), self._command_timeout_s)
        listener, self.key_listener = self.key_listener, None
        if listener is not None:
            await listener.close()
        pool, self._pool = self._pool, None
        writer, self._writer_conn = self._writer_conn, None
        if pool is not None and writer is not None:
            await self._give_back(pool, writer)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *_DRIVER_ERRORS):
                pool.terminate()

    @asynccontextmanager
    async def _commit_conn(self) -> Any:
        """The connection of a commit: the one the writer holds across commits while one
        caller commits at a time (the service's write queue), which saves the pool's acquire
        and release in each; a second caller meanwhile takes one from the pool. After a
        failure the connection goes back to the pool (which replaces a broken one) and the
        next commit takes another."""
        pool = self._pool
        if self._writer_busy or pool is None:
            async with self._conn("commit") as conn:
                yield conn
            return
        self._writer_busy = True
        try:
            writer = self._writer_conn
            if writer is not None:
                try:
                    closed = writer.is_closed()
                except asyncpg.InterfaceError:  # the pool took it back when it closed
                    closed = True
                if closed:
                    self._writer_conn = None
                    await self._give_back(pool, writer)
            if self._writer_conn is None:
                self._writer_conn = await pool.acquire(timeout=self._connect_timeout_s)
            conn = self._writer_conn
            try:
                yield conn
            except BaseException:
                self._writer_conn = None
                await self._give_back(pool, conn)
                raise
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"commit failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._writer_busy = False

    @staticmethod
    async def _give_back(pool: asyncpg.Pool, conn: Any) -> None:
        """Release ``conn`` to ``pool``; one that cannot be released is closed (one the pool
        took back already, when it closed, raises on both: nothing is left to do)."""
        try:
            await pool.release(conn)
        except asyncio.CancelledError:
            with suppress(Exception):
                conn.terminate()
            raise
        except Exception:
            with suppress(Exception):
                conn.terminate()

    @asynccontextmanager
    async def _conn(self, what: str) -> Any:
        if self._pool is None:
            raise StorageError(f"{what}: the database is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout_s) as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from None

    async def writable(self) -> bool:
        try:
            async with self._conn("readiness") as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT NOT pg_is_in_recovery()"
                        " AND current_setting('transaction_read_only') = 'off'",
                        timeout=1.0,
                    )
                )
        except StorageError:
            return False

    # -- ingest ----------------------------------------------------------------------------

    async def insert_batches(
        self,
        parts: Sequence[dict[str, list[tuple[Any, ...]]]],
        claims: Sequence[Claim | None] = (),
    ) -> int:
        wanted = _days(parts)
        async with self._commit_conn() as conn:
            if self.partitions.missing(wanted):
                await self.partitions.ensure(conn, wanted)
            for attempt in range(5):
                try:
                    count = await self._insert(conn, parts, claims)
                    break
                except _RETRIED:
                    if attempt == 4:
                        raise
                    for c in claims:
                        if c is not None:
                            c.existing = None
                    await asyncio.sleep(0.01 * (attempt + 1))
        if self._fold_every == 0:
            # Committed already: a failed fold must not fail the request (the client would
            # send it again); the next one folds these rows, and answers are exact meanwhile.
            try:
                await self.fold()
            except StorageError as exc:
                log.warning("folding into the rollups failed, the next fold retries: %s", exc)
        return count

    async def fold(self, *, wait: bool = False) -> int:
        """Fold the rows committed so far (by any replica) into the rollups, unless another
        replica is at it (``wait``: after it); the rows folded. Queries are exact either
        way."""
        async with self._conn("folding into the rollups") as conn:
            if not await conn.fetchval(_PENDING_SQL):
                return 0
            locked = False
            try:
                if wait:
                    await conn.execute("SELECT pg_advisory_lock($1)", pg_rollups.FOLD_LOCK)
                    locked = True
                else:
                    locked = await conn.fetchval(
                        "SELECT pg_try_advisory_lock($1)", pg_rollups.FOLD_LOCK
                    )
                    if not locked:
                        return 0
                last = await pg_rollups.last_ids(conn)
                async with conn.transaction():
                    return await pg_rollups.fold(conn, last)
            finally:
                if locked or wait:  # (a wait cut short may have been granted)
                    try:
                        await conn.execute("SELECT pg_advisory_unlock($1)", pg_rollups.FOLD_LOCK)
                    except BaseException:
                        conn.terminate()  # never back into the pool holding the lock
                        raise

    async def _fold_loop(self, every_s: float) -> None:
        """Fold every ``every_s``, or sooner once ``FOLD_MAX_ROWS`` rows wait (by any
        replica)."""
        since = time.monotonic()
        while True:
            await asyncio.sleep(min(every_s, _FOLD_CHECK_S))
            try:
                if time.monotonic() - since < every_s:
                    async with self._conn("folding into the rollups") as conn:
                        if int(await conn.fetchval(_PENDING_SQL)) < FOLD_MAX_ROWS:
                            continue
                await self.fold()
            except StorageError as exc:
                log.warning("folding into the rollups failed, the next fold retries: %s", exc)
            since = time.monotonic()

    async def _insert(
        self,
        conn: Conn,
        parts: Sequence[dict[str, list[tuple[Any, ...]]]],
        claims: Sequence[Claim | None],
    ) -> int:
        """A group of fewer than ``COPY_ROWS`` rows of each family: one call of the ingest
        function with the claims, its own transaction (one round trip). Else, or when a claim
        is lost: BEGIN and the watermark's shared lock in one round trip; the claims one by
        one; COPY of each family with many rows; the function for the rest and the rollups;
        COMMIT."""
        sizes: dict[str, int] = {}
        for part in parts:
            for kind, rows in part.items():
                sizes[kind] = sizes.get(kind, 0) + len(rows)
        claimed = sorted((c for c in claims if c is not None), key=_claim_order)
        windows = {c.window_s for c in claimed}
        if len(windows) <= 1 and all(n < COPY_ROWS for n in sizes.values()):
            try:
                return await self._ingest(conn, parts, (), claimed)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate not in _CLAIM_FALLBACK:
                    raise
        count = 0
        await conn.execute(_BEGIN)
        try:
            if any(claims):
                await _claim(conn, claims)
                parts = [p for p, c in zip(parts, claims, strict=True) if not (c and c.existing)]
            copied = []
            for kind in sorted(k for k, n in sizes.items() if n >= COPY_ROWS):
                rows = [r for part in parts for r in part.get(kind, ())]
                if len(rows) >= COPY_ROWS:
                    await conn.copy_records_to_table(
                        TABLE_OF_TYPE[kind], records=rows, columns=_COLUMNS[kind]
                    )
                    copied.append(kind)
                    count += len(rows)
            count += await self._ingest(conn, parts, copied, ())
            await conn.execute("COMMIT")
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                with suppress(*_DRIVER_ERRORS):
                    await conn.execute("ROLLBACK")
            raise
        return count

    async def _ingest(
        self,
        conn: Conn,
        parts: Sequence[dict[str, list[tuple[Any, ...]]]],
        copied: Sequence[str],
        claims: Sequence[Claim],
    ) -> int:
        """``claims`` (sorted, one window) and the rows of the families not ``copied``, in one
        call of the ingest function; its count of raw rows."""
        now = _now_ms()
        cutoff = now - int(claims[0].window_s * 1000) if claims else None
        keys = [(c.service, c.key, c.fingerprint, c.status, c.response, now) for c in claims]
        raw: list[list[tuple[Any, ...]] | None] = []
        count = 0
        for kind in _KINDS:
            # The table's row type begins with its id (NULL here: the sequence gives it).
            rows = [] if kind in copied else [(None, *r) for p in parts for r in p.get(kind, ())]
            raw.append(rows or None)
            count += len(rows)
        await conn.execute(_INGEST_SQL, cutoff, keys or None, *raw)
        return count

    async def idempotency_lookup(self, service: str, key: str, window_s: float) -> Stored | None:
        async with self._conn("idempotency lookup") as conn:
            return await _lookup(conn, service, key, _now_ms() - int(window_s * 1000))

    # -- keys ------------------------------------------------------------------------------

    async def list_keys(self, *, active_only: bool = False) -> list[KeyRecord]:
        where = " WHERE revoked_at IS NULL" if active_only else ""
        async with self._conn("reading keys") as conn:
            rows = await conn.fetch(f"SELECT {_KEY_SELECT} FROM api_keys{where} ORDER BY id")
        return [_key(r) for r in rows]

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
        async with self._conn("creating a key") as conn:
            try:
                return await _insert_key(
                    conn,
                    service,
                    role,
                    key_hash,
                    key_prefix,
                    rate_limit_per_min,
                    source,
                    description,
                    aliases,
                )
            except asyncpg.UniqueViolationError:
                raise StorageError("a key with this secret already exists") from None

    async def revoke_key(self, key_id: int) -> KeyRecord | None:
        async with self._conn("revoking a key") as conn:
            return await _revoke(conn, key_id)

    async def rotate_key(
        self, key_id: int, *, key_hash: str, key_prefix: str, source: str
    ) -> tuple[KeyRecord, KeyRecord] | None:
        async with self._conn("rotating a key") as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_KEY_SELECT} FROM api_keys WHERE id = $1 AND revoked_at IS NULL"
                " FOR UPDATE",
                key_id,
            )
            if row is None:
                return None
            old = _key(row)
            revoked = await _revoke(conn, key_id)
            assert revoked is not None
            new = await _insert_key(
                conn,
                old.service,
                old.role,
                key_hash,
                key_prefix,
                old.rate_limit_per_min,
                source,
                old.description,
                old.aliases,
            )
            return revoked, new

    async def reconcile_env_keys(
        self, wanted: dict[tuple[str, str | None], tuple[str, str]]
    ) -> dict[str, Any]:
        counts: dict[str, Any] = {"kept": 0, "added": 0, "revoked": 0, "refused": []}
        async with self._conn("reconciling keys") as conn, conn.transaction():
            # Replicas starting together reconcile one after the other.
            await conn.execute("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
            kept: set[tuple[str, str | None]] = set()
            rows = await conn.fetch(
                f"SELECT {_KEY_SELECT} FROM api_keys WHERE revoked_at IS NULL ORDER BY id"
            )
            for key in map(_key, rows):
                if key.source != "env":
                    continue
                want = wanted.get((key.role, key.service))
                if want is not None and want[0] == key.key_hash:
                    kept.add((key.role, key.service))
                    continue
                await _revoke(conn, key.id)
                counts["revoked"] += 1
            counts["kept"] = len(kept)
            for (role, service), (key_hash, prefix) in wanted.items():
                if (role, service) in kept:
                    continue
                row = await conn.fetchrow(
                    "SELECT id, revoked_at FROM api_keys WHERE key_hash = $1", key_hash
                )
                if row is not None and row["revoked_at"] is not None:
                    counts["refused"].append((role, service))
                elif row is not None:
                    await conn.execute(
                        "UPDATE api_keys SET source = 'env', role = $1, service = $2 WHERE id = $3",
                        role,
                        service,
                        row["id"],
                    )
                    counts["added"] += 1
                else:
                    await _insert_key(conn, service, role, key_hash, prefix, None, "env", None, ())
                    counts["added"] += 1
        return counts

    # -- retention and upkeep --------------------------------------------------------------

    async def retention_policies(self, default_days: int) -> list[Policy]:
        async with self._conn("reading retention policies") as conn:
            rows = await conn.fetch(
                "SELECT table_name, retention_days, enabled FROM retention_policies"
                " ORDER BY table_name"
            )
        return [
            Policy(r[0], r[1] if r[1] is not None else default_days, r[1] is None, bool(r[2]))
            for r in rows
            if r[0] in TABLES
        ]

    async def set_retention_policy(
        self, tables: Sequence[str], retention_days: int | None, enabled: bool | None
    ) -> None:
        for table in tables:
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}")
        async with self._conn("setting a retention policy") as conn, conn.transaction():
            for table in tables:
                await conn.execute(
                    "UPDATE retention_policies SET retention_days = $1, updated_at = $2"
                    " WHERE table_name = $3",
                    retention_days,
                    _now_ms(),
                    table,
                )
                if enabled is not None:
                    await conn.execute(
                        "UPDATE retention_policies SET enabled = $1 WHERE table_name = $2",
                        int(enabled),
                        table,
                    )

    def _time_column(self, table: str) -> str:
        if table in TABLES:
            return "ts"
        if table in rollups.TABLES:
            return "bucket"
        raise ValueError(f"unknown table {table!r}")

    async def count_expired(self, table: str, before_ms: int) -> int:
        column = self._time_column(table)
        async with self._conn("counting expired rows") as conn:
            return int(
                await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} < $1", before_ms)
            )

    async def delete_expired(self, table: str, before_ms: int, limit: int) -> int:
        """Raw tables: drop the partitions wholly before ``before_ms`` (their rows counted),
        then delete up to ``limit`` older rows of the partition holding the cutoff. Rollup
        tables: delete whole buckets, about ``limit`` rows. Another replica already at it: 0."""
        column = self._time_column(table)
        if column == "bucket":
            async with self._conn("retention") as conn:
                async with conn.transaction():
                    upto = await conn.fetchval(
                        f"SELECT bucket FROM {table} WHERE bucket < $1 ORDER BY bucket"
                        " LIMIT 1 OFFSET $2",
                        before_ms,
                        limit - 1,
                    )
                    upto = before_ms if upto is None else upto + 1
                    status = await conn.execute(f"DELETE FROM {table} WHERE bucket < $1", upto)
                return int(status.split()[-1])
        # Only rows the rollups hold are deleted: fold first (rows committed later and
        # already expired wait for the next run).
        await self.fold()
        async with self._conn("retention") as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                return 0
            try:
                mark = int(await conn.fetchval(pg_rollups.MARK_SQL, table))
                dropped = 0
                for partition in await self.partitions.expired(conn, table, before_ms):
                    if await conn.fetchval(
                        f"SELECT EXISTS (SELECT FROM {partition} WHERE id > $1)", mark
                    ):
                        continue
                    dropped += await self.partitions.drop(conn, table, partition)
                day = before_ms - before_ms % DAY_MS
                if (table, day) not in self.partitions.known:
                    return dropped
                part = partition_name(table, day)
                status = await conn.execute(
                    f"DELETE FROM {part} WHERE ctid IN (SELECT ctid FROM {part}"
                    " WHERE ts < $1 AND id <= $3 LIMIT $2)",
                    before_ms,
                    limit,
                    mark,
                )
                # Fewer than ``limit`` in all: nothing older is left.
                return dropped + int(status.split()[-1])
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
                except BaseException:
                    # Never back into the pool holding the lock (the pool's reset keeps it).
                    conn.terminate()
                    raise

    async def forget_idempotency_keys(self, before_ms: int, limit: int) -> int:
        async with self._conn("forgetting idempotency keys") as conn:
            status = await conn.execute(
                "DELETE FROM idempotency_keys WHERE ctid IN (SELECT ctid FROM idempotency_keys"
                " WHERE committed_at < $1 LIMIT $2)",
                before_ms,
                limit,
            )
        return int(status.split()[-1])

    async def compact_rollups(self, now_ms: int) -> int:
        """Also the upkeep tick's partition work: the days ahead exist before they begin."""
        async with self._conn("rollup compaction") as conn:
            await self.partitions.ensure_ahead(conn, now_ms)
            return await pg_rollups.compact(conn, now_ms)

    # -- reads -----------------------------------------------------------------------------

    async def analytics(self, view: Callable[[Reader], Awaitable[T]]) -> T:
        async with (
            self._conn("analytics") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await view(Reader(conn))

    async def stats(self) -> dict[str, Any]:
        async with self._conn("stats") as conn:
            rows = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
            size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
            partitions = len(self.partitions.known)
            version = await migrations.current_version(conn)
        return {
            "path": self.description,
            "rows": rows,
            "total_rows": sum(rows.values()),
            "database_bytes": size,
            "partitions": partitions,
            "schema_version": version,
        }

    async def table_stats(self, default_days: int, rollup_days: int) -> dict[str, dict[str, Any]]:
        policies = {p.table: p for p in await self.retention_policies(default_days)}
        out: dict[str, dict[str, Any]] = {}
        async with self._conn("table stats") as conn:
            for table in (*TABLES, *rollups.TABLES):
                column = self._time_column(table)
                count, oldest, newest = await conn.fetchrow(
                    f"SELECT count(*), min({column}), max({column}) FROM {table}"
                )
                policy = policies.get(table)
                raw = table in TABLES
                out[table] = {
                    "record_count": count,
                    "oldest_record": iso_ms(oldest),
                    "newest_record": iso_ms(newest),
                    "has_retention_policy": policy is not None if raw else True,
                    "retention_days": (policy.retention_days if policy else None)
                    if raw
                    else rollup_days,
                    "policy_active": (policy.enabled if policy else None) if raw else True,
                }
        return out

    async def retention_preview(
        self, default_days: int, tables: Sequence[str] | None, now_s: float
    ) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        policies = await self.retention_policies(default_days)
        async with self._conn("retention preview") as conn:
            for policy in policies:
                if not policy.enabled or (tables is not None and policy.table not in tables):
                    continue
                table = policy.table
                cutoff = cutoff_ms(policy.retention_days, now_s)
                expired, oldest, newest = await conn.fetchrow(
                    f"SELECT count(*), min(ts), max(ts) FROM {table} WHERE ts < $1", cutoff
                )
                total = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
                out[table] = retention_preview_entry(
                    policy.retention_days, cutoff, expired, total, oldest, newest
                )
        return out

    async def database_size(self) -> dict[str, Any]:
        async with self._conn("database size") as conn:
            total = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        mib = 1024 * 1024
        return {
            "total_bytes": total,
            "total_mb": round(total / mib, 2),
            "total_gb": round(total / mib / 1024, 3),
        }

    async def reference_sql(self, enabled: bool | None = None) -> bool:
        """The ``metrics`` view always has the reference's text ``timestamp``; the raw tables
        have no such column on PostgreSQL (the reference's SQL is SQLite's dialect)."""
        if enabled:
            raise StorageError(
                "the reference's SQLite timestamp column is not available on PostgreSQL"
            )
        return False

    async def drop_reference(self) -> list[str]:
        return []

    # -- the test and bench helpers --------------------------------------------------------

    async def execute(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement (tests, benchmarks, the CLI's diagnostics)."""
        async with self._conn("query") as conn:
            return [tuple(r) for r in await conn.fetch(sql, *args)]


def _claim_order(c: Claim) -> tuple[str, str]:
    return (c.service, c.key)


async def _claim(conn: Conn, claims: Sequence[Claim | None]) -> None:
    now = _now_ms()
    for c in sorted((c for c in claims if c is not None), key=_claim_order):
        cutoff = now - int(c.window_s * 1000)
        won = await conn.fetchval(
            _CLAIM_SQL, c.service, c.key, c.fingerprint, c.status, c.response, now, cutoff
        )
        if won is None:
            c.existing = await _lookup(conn, c.service, c.key, cutoff)


async def _lookup(conn: Conn, service: str, key: str, cutoff: int) -> Stored | None:
    from metrics_service.idempotency import Stored

    row = await conn.fetchrow(_LOOKUP_SQL, service, key, cutoff)
    return None if row is None else Stored(row[0], int(row[1]), bytes(row[2]))


async def _insert_key(
    conn: Conn,
    service: str | None,
    role: str,
    key_hash: str,
    key_prefix: str,
    rate_limit_per_min: int | None,
    source: str,
    description: str | None,
    aliases: tuple[str, ...],
) -> KeyRecord:
    row = await conn.fetchrow(
        "INSERT INTO api_keys (service, role, key_hash, key_prefix, rate_limit_per_min, source,"
        " description, created_at, service_aliases) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        f" RETURNING {_KEY_SELECT}",
        service,
        role,
        key_hash,
        key_prefix,
        rate_limit_per_min,
        source,
        description,
        _now_ms(),
        ",".join(aliases) or None,
    )
    assert row is not None
    return _key(row)


async def _revoke(conn: Conn, key_id: int) -> KeyRecord | None:
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2"
        f" RETURNING {_KEY_SELECT}",
        _now_ms(),
        key_id,
    )
    return None if row is None else _key(row)


if TYPE_CHECKING:
    from metrics_service.storage.backend import StorageBackend

    def _conforms(backend: Backend) -> StorageBackend:
        """mypy checks here that the class keeps the whole interface."""
        return backend
