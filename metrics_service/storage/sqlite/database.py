"""The SQLite database: connections, batched inserts, retention deletes and statistics.

Only one connection writes (the backend's writer thread); everything here that writes is a
plain function of a ``sqlite3.Connection`` so that the writer, tools and tests share it.
Table names in SQL come from the fixed ``TABLES`` whitelist, never from input.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from metrics_service.errors import StorageError
from metrics_service.storage import schema
from metrics_service.storage.backend import Policy, cutoff_ms
from metrics_service.storage.schema import TABLE_OF_TYPE, TABLES
from metrics_service.storage.sqlite import idempotency, migrations, reference, rollups
from metrics_service.storage.sqlite.transaction import write_transaction

if TYPE_CHECKING:
    from metrics_service.idempotency import Claim

__all__ = ["TABLES", "TABLE_OF_TYPE", "cutoff_ms"]


def _insert_sql(kind: str) -> str:
    names = schema.FAMILY[kind].names
    marks = ", ".join("?" * len(names))
    return f"INSERT INTO {TABLE_OF_TYPE[kind]} ({', '.join(names)}) VALUES ({marks})"


INSERT_SQL = {kind: _insert_sql(kind) for kind in TABLE_OF_TYPE}
#: Below this many rows of a type in a commit, the full one-row statement is used as it is.
_NARROW_MIN_ROWS = 8
#: Rows per multi-row INSERT; a remainder goes in power-of-two statements (at most six distinct
#: statements per column set, so sqlite3's statement cache keeps them all). 32 rows of the widest
#: family bind 960 parameters, below even old SQLite's limit of 999.
_ROWS_PER_INSERT = 32


@functools.lru_cache(maxsize=512)
def _multi_sql(kind: str, present: tuple[int, ...], rows: int) -> str:
    names = [schema.FAMILY[kind].names[i] for i in present]
    one = f"({', '.join('?' * len(names))})"
    values = ", ".join([one] * rows)
    return f"INSERT INTO {TABLE_OF_TYPE[kind]} ({', '.join(names)}) VALUES {values}"


def _insert_kind(conn: sqlite3.Connection, kind: str, rows: list[tuple[Any, ...]]) -> int:
    """Insert ``rows`` of one type: several rows per statement, binding only the columns that
    some row sets.

    ``executemany`` steps a one-row statement per row, and each step drops and takes back the
    GIL and runs the statement's prologue again; one statement of 32 rows does that once (about
    1 us less per row at batch 100, bench/breakdown.py). Each bound parameter costs too, NULL
    included (a tool call row has 30 columns, of which a client typically sets 13): a column no
    row of the commit sets is left out of the statement and stored as NULL all the same (no raw
    table has a column default). Finding those columns is C work: the rows transposed,
    ``tuple.count`` of ``None`` per column. Small commits keep the one-row statement."""
    n = len(rows)
    if n < _NARROW_MIN_ROWS:
        return int(conn.executemany(INSERT_SQL[kind], rows).rowcount)
    columns = list(zip(*rows, strict=True))
    present = tuple(i for i, column in enumerate(columns) if column.count(None) != n)
    values = chain.from_iterable(map(itemgetter(*present), rows))
    count = done = 0
    while done < n:
        left = n - done
        size = _ROWS_PER_INSERT if left >= _ROWS_PER_INSERT else 1 << (left.bit_length() - 1)
        params = list(islice(values, size * len(present)))
        count += conn.execute(_multi_sql(kind, present, size), params).rowcount
        done += size
    return count


def _last_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])


# Binding ``None`` is the slowest parameter of all in CPython's sqlite3 (3.11): ``None`` is not
# one of the types bound directly, so every ``None`` goes through the adapter lookup, which fails
# and builds an error before falling back to NULL: about 0.4 us each, and a typical row carries
# five to ten of them (absent dimensions). An adapter for ``NoneType`` that returns ``None`` (a
# C-level ``dict.get`` of an empty dict, so no Python frame) makes the lookup succeed, and NULL
# is bound as before. It is process-wide, like every sqlite3 adapter, and changes no value.
sqlite3.register_adapter(type(None), cast(Callable[[None], None], {}.get))


def connect(
    path: Path | str,
    *,
    synchronous: str = "full",
    busy_timeout_ms: int = 5000,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open the database in WAL mode, autocommit (transactions are explicit)."""
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(
            path,
            isolation_level=None,
            check_same_thread=check_same_thread,
            timeout=busy_timeout_ms / 1000,
            # Room for the multi-row inserts of every column set and size (``_multi_sql``): a
            # statement of 32 rows dropped from the cache costs its parse again.
            cached_statements=512,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _wal(conn, busy_timeout_ms)
        conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA temp_store = MEMORY")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    return conn


def _wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Switch to WAL. Changing the journal mode does not always wait on the busy handler (several
    processes opening a new file at once get "database is locked" at once), so retry until the
    busy timeout."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            )
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def open_database(path: Path | str, **kwargs: Any) -> tuple[sqlite3.Connection, list[int]]:
    """Connect and apply migrations; return the connection and the versions applied."""
    conn = connect(path, **kwargs)
    try:
        # A file of the MCP Gateway Registry's metrics-service: its tables become reference_*
        # (storage/reference.py) and, after the migrations, its SQL's timestamp column is added.
        adopted = reference.adopt_schema(conn)
        applied = migrations.apply(conn)
        if adopted:
            reference.set_sql_columns(conn, True)
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"cannot migrate database {path}: {exc}") from exc
    return conn, applied


def insert_rows(
    conn: sqlite3.Connection,
    parts: Sequence[dict[str, list[tuple[Any, ...]]]],
    claims: Sequence[Claim | None] = (),
    deferred: Deferred | None = None,
) -> int:
    """Insert the rows of several requests in one transaction; all or nothing.

    A failure rolls the whole transaction back, so the caller can retry without duplicates.
    ``claims`` (one per part, or none) claims idempotency keys in the same transaction; the part
    of a key already committed is not inserted (its claim's ``existing`` says so).

    The rollups catch up with the raw tables in the same transaction (``rollups.catch_up``),
    unless ``deferred`` (the service's writer) holds the rows back for a later commit: then they
    are added to its pending rows, folded once those are due, and ``deferred.pending`` changes
    only once this commit held.
    """
    count = 0
    try:
        with write_transaction(conn):
            if any(claims):
                idempotency.claim(conn, [c for c in claims if c is not None])
                parts = [p for p, c in zip(parts, claims, strict=True) if not (c and c.existing)]
            kinds: set[str] = set()
            for part in parts:
                kinds.update(part)
            ids: dict[str, tuple[int, int]] = {}
            for kind in kinds:
                rows = [row for part in parts for row in part.get(kind, ())]
                inserted = _insert_kind(conn, kind, rows)
                count += inserted
                table = TABLE_OF_TYPE[kind]
                if inserted and table in rollups.FOLDED:
                    last = _last_id(conn)
                    ids[table] = (last - inserted + 1, last)
            pending = (deferred.pending if deferred else rollups.Pending()).extended(parts, ids)
            if deferred is None or pending.due(deferred.max_rows, deferred.max_age_s):
                rollups.catch_up(conn, pending)
                pending = rollups.Pending()
    except sqlite3.Error as exc:
        raise StorageError(f"commit failed: {exc}") from exc
    if deferred is not None:
        deferred.pending = pending
    return count


@dataclass(slots=True)
class Deferred:
    """A writer's rows not yet in the rollups (``rollups.Pending``) and when it folds them."""

    pending: rollups.Pending = field(default_factory=rollups.Pending)
    max_rows: int = rollups.FOLD_MAX_ROWS
    max_age_s: float = rollups.FOLD_MAX_AGE_S

    def catch_up(self, conn: sqlite3.Connection) -> int:
        """Fold everything pending now, in a transaction of its own."""
        try:
            with write_transaction(conn):
                folded = rollups.catch_up(conn, self.pending)
        except sqlite3.Error as exc:
            raise StorageError(f"folding into the rollups failed: {exc}") from exc
        self.pending = rollups.Pending()
        return folded


def delete_expired_chunk(
    conn: sqlite3.Connection,
    table: str,
    before_ms: int,
    limit: int,
    deferred: Deferred | None = None,
) -> int:
    """Delete up to ``limit`` rows of ``table`` whose event time is before ``before_ms``, in one
    transaction that first brings the rollups up to date (no row leaves before it is in them;
    ``deferred``: the writer's pending rows)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    try:
        with write_transaction(conn):
            rollups.catch_up(conn, deferred.pending if deferred else None)
            cursor = conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE ts < ? LIMIT ?)",
                (before_ms, limit),
            )
            rollups.after_delete(conn, table)
    except sqlite3.Error as exc:
        raise StorageError(f"retention delete failed: {exc}") from exc
    if deferred is not None:
        deferred.pending = rollups.Pending()
    return int(cursor.rowcount)


def count_expired(conn: sqlite3.Connection, table: str, before_ms: int) -> int:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    return int(
        conn.execute(f"SELECT count(*) FROM {table} WHERE ts < ?", (before_ms,)).fetchone()[0]
    )


POLICIES_SQL = (
    "SELECT table_name, retention_days, enabled FROM retention_policies ORDER BY table_name"
)


def policies_of(rows: Iterable[Sequence[Any]], default_days: int) -> list[Policy]:
    return [
        Policy(table, days if days is not None else default_days, days is None, bool(enabled))
        for table, days, enabled in rows
        if table in TABLES
    ]


def retention_policies(conn: sqlite3.Connection, default_days: int) -> list[Policy]:
    return policies_of(conn.execute(POLICIES_SQL).fetchall(), default_days)


def set_retention_policy(
    conn: sqlite3.Connection, table: str, retention_days: int | None, enabled: bool | None
) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    now = int(time.time() * 1000)
    conn.execute(
        "UPDATE retention_policies SET retention_days = ?, updated_at = ? WHERE table_name = ?",
        (retention_days, now, table),
    )
    if enabled is not None:
        conn.execute(
            "UPDATE retention_policies SET enabled = ? WHERE table_name = ?", (int(enabled), table)
        )
