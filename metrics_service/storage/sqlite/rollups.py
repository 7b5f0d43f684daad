"""The SQLite SQL of the rollups: table creation and backfill (migrations 2, 4 and 5), the upserts
of each commit, compaction, retention and the reads of a query range.

What is aggregated, how states merge and how a range is split is shared by every backend
(``storage/rollups.py``); only the SQL is here. Table and column names come from the cubes'
fixed lists, never from input; values are bound.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from metrics_service.storage import rollups, schema
from metrics_service.storage.backend import Aggregate
from metrics_service.storage.rollups import (
    BOUNDS_MS,
    DAY_MS,
    LEVELS,
    MIN_MAX,
    NBUCKETS,
    RAW_TABLE,
    Cube,
    Query,
    merge_function,
    missing_value,
    sql_type,
)
from metrics_service.storage.sqlite.transaction import write_transaction

# -- schema (migrations 2, 4, 5; frozen there: the generated SQL must not change) ---------------


def _create_sql(cube: Cube, level: str) -> str:
    dims = ", ".join(
        f"{d} {'INTEGER' if d in rollups.INT_DIMS else 'TEXT'} NOT NULL" for d in cube.dims
    )
    states = []
    for column in cube.state_columns:
        kind = sql_type(column).upper()
        default = "" if column.endswith(MIN_MAX) else " NOT NULL DEFAULT 0"
        states.append(f"{column} {kind}{default}")
    return (
        f"CREATE TABLE {cube.table(level)} (bucket INTEGER NOT NULL, {dims}, {', '.join(states)},"
        f" PRIMARY KEY (bucket, {', '.join(cube.dims)})) WITHOUT ROWID"
    )


def _keys_sql(dims: Iterable[str]) -> list[str]:
    return [f"coalesce({d}, {missing_value(d)!r})" for d in dims]


def _values_sql(cube: Cube) -> list[str]:
    """SQL aggregates of raw rows into a state, in ``state_columns`` order."""
    values = ["count(*)", "total(value)", *(f"coalesce(sum({c}), 0)" for c in cube.sums)]
    for h in cube.hists:
        values += [f"count({h})", f"total({h})", f"min({h})", f"max({h})"]
        for i in range(NBUCKETS):
            if i == 0:
                test = f"{h} <= {BOUNDS_MS[0]!r}"
            elif i < NBUCKETS - 1:
                test = f"{h} > {BOUNDS_MS[i - 1]!r} AND {h} <= {BOUNDS_MS[i]!r}"
            else:
                test = f"{h} > {BOUNDS_MS[-1]!r}"
            values.append(f"count(CASE WHEN {test} THEN 1 END)")
    return values


def _from_raw_sql(cube: Cube, level: str, where: str) -> str:
    """Aggregate raw rows (``where`` picks them) into ``cube``'s ``level`` table."""
    width = LEVELS[level]
    keys, values = _keys_sql(cube.dims), _values_sql(cube)
    return (
        f"INSERT INTO {cube.table(level)} (bucket, {', '.join(cube.dims)}, "
        f"{', '.join(cube.state_columns)})"
        f" SELECT ts / {width} * {width}, {', '.join(keys)}, {', '.join(values)}"
        f" FROM {RAW_TABLE[cube.kind]} WHERE {where}"
        f" GROUP BY 1, {', '.join(str(i + 2) for i in range(len(cube.dims)))}"
    )


_TODAY_SQL = f"CAST(strftime('%s', 'now') AS INTEGER) * 1000 / {DAY_MS} * {DAY_MS}"


def _create_and_backfill(cubes: Iterable[Cube]) -> list[str]:
    """Create ``cubes``' tables and fill them from the raw rows already stored: hours from every
    row, days up to the compaction watermark."""
    statements = []
    for cube in cubes:
        for level in cube.levels:
            statements.append(_create_sql(cube, level))
            where = (
                "1"
                if level == "hour"
                else "ts < (SELECT until_ms FROM rollup_watermark WHERE name = 'day')"
            )
            statements.append(_from_raw_sql(cube, level, where))
    return statements


def migration_v2() -> list[str]:
    """Create the rollup tables and fill them from the raw rows already stored: hours from every
    row, days up to the start of today (the compaction watermark)."""
    return [
        "CREATE TABLE rollup_watermark (name TEXT PRIMARY KEY, until_ms INTEGER NOT NULL)",
        f"INSERT INTO rollup_watermark VALUES ('day', {_TODAY_SQL})",
        *_create_and_backfill(rollups._V2_CUBES),
    ]


def migration_v4() -> list[str]:
    """The tool-by-client cube, backfilled like migration 2 up to the current watermark."""
    return _create_and_backfill(rollups._V4_CUBES)


def migration_v5() -> list[str]:
    """The registry-operation and health-check cubes (their raw tables are created just before)."""
    return _create_and_backfill(rollups._V5_CUBES)


# -- each commit -------------------------------------------------------------------------------


def _upsert_sql(cube: Cube, level: str) -> str:
    columns = ["bucket", *cube.dims, *cube.state_columns]
    updates = []
    for c in cube.state_columns:
        if c.endswith("_min"):
            updates.append(f"{c} = coalesce(min({c}, excluded.{c}), {c}, excluded.{c})")
        elif c.endswith("_max"):
            updates.append(f"{c} = coalesce(max({c}, excluded.{c}), {c}, excluded.{c})")
        else:
            updates.append(f"{c} = {c} + excluded.{c}")
    return (
        f"INSERT INTO {cube.table(level)} ({', '.join(columns)}) VALUES "
        f"({', '.join('?' * len(columns))})"
        f" ON CONFLICT (bucket, {', '.join(cube.dims)}) DO UPDATE SET {', '.join(updates)}"
    )


_UPSERT = {
    (cube.name, level): _upsert_sql(cube, level) for cube in rollups.CUBES for level in cube.levels
}
_WATERMARK_SQL = "SELECT until_ms FROM rollup_watermark WHERE name = 'day'"


def day_watermark(conn: sqlite3.Connection) -> int:
    """Days before this (ms) are in the day tables; later ones are compacted once complete."""
    return int(conn.execute(_WATERMARK_SQL).fetchone()[0])


# -- folding: the rollups hold every raw row up to a mark per raw table ----------------------
#
# On SQLite the rollups are not maintained by every commit: a commit stores its raw rows, and
# the rows committed since the last fold are added to the rollups ("folded") every
# ``FOLD_MAX_AGE_S`` or ``FOLD_MAX_ROWS`` rows, in the transaction of a later commit. The
# invariant, in every committed state: the rollups aggregate exactly the raw rows whose id is at
# most the table's mark in ``rollup_folded``; a query adds the rows above the mark from the raw
# table (``tail``), in the same read transaction, so answers stay exact at every moment. Each
# fold takes every row above the mark, whoever wrote it: from the writer's memory when its
# pending rows are exactly those (the common case: one writer), else read back from the table
# (another process wrote, or after a crash). At batch 1 this is most of the rollups' cost gone:
# an upsert of a 44-column rollup row costs about 10 us, and every commit touched ten of them.

#: The raw tables that feed a cube, in a fixed order.
FOLDED: tuple[str, ...] = tuple(dict.fromkeys(RAW_TABLE.values()))
_KIND_OF: dict[str, str] = {table: kind for kind, table in RAW_TABLE.items()}
#: Fold when this many rows are pending, or when the oldest has waited this long.
FOLD_MAX_ROWS = 5_000
FOLD_MAX_AGE_S = 0.5
_MARKS_SQL = "SELECT raw_table, last_id FROM rollup_folded"
_READ_CHUNK = 20_000


def migration_v8() -> list[str]:
    """The fold marks, every row already in the rollups (earlier versions maintained them in
    each commit)."""
    return [
        "CREATE TABLE rollup_folded (raw_table TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
        *(
            f"INSERT INTO rollup_folded VALUES ('{table}', "
            f"(SELECT coalesce(max(id), 0) FROM {table}))"
            for table in FOLDED
        ),
    ]


Part = dict[str, list[tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class Pending:
    """Rows a writer committed and has not folded: their parts and, per raw table, the range of
    ids they were given (``exact`` is False once a range did not continue the previous one:
    another writer's rows are in between, and only the table can tell which)."""

    #: ``(earlier, the parts of one commit)``, nested: extending it copies nothing.
    parts: tuple[Any, ...] = ()
    rows: int = 0
    since: float = 0.0
    ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    exact: bool = True

    def extended(self, parts: Sequence[Part], ids: dict[str, tuple[int, int]]) -> Pending:
        """These pending too (a new value: the writer keeps it only once its commit held)."""
        merged = dict(self.ids)
        exact = self.exact
        for table, (first, last) in ids.items():
            have = merged.get(table)
            if have is None:
                merged[table] = (first, last)
            elif have[1] + 1 == first:
                merged[table] = (have[0], last)
            else:
                exact = False
        rows = sum(len(r) for part in parts for kind, r in part.items() if kind in RAW_TABLE)
        return Pending(
            (self.parts, tuple(parts)),
            self.rows + rows,
            self.since if self.parts else time.monotonic(),
            merged,
            exact,
        )

    def all_parts(self) -> list[Part]:
        """The pending parts, in commit order."""
        commits = []
        node = self.parts
        while node:
            node, last = node
            commits.append(last)
        return [part for commit in reversed(commits) for part in commit]

    def due(self, max_rows: int = FOLD_MAX_ROWS, max_age_s: float = FOLD_MAX_AGE_S) -> bool:
        return self.rows >= max_rows or (
            bool(self.parts) and time.monotonic() - self.since >= max_age_s
        )


def marks(conn: sqlite3.Connection) -> dict[str, int]:
    """Raw table -> the id of its last row folded into the rollups."""
    return marks_of(conn.execute(_MARKS_SQL).fetchall())


def marks_of(rows: Iterable[Sequence[Any]]) -> dict[str, int]:
    """``marks`` from the rows of ``_MARKS_SQL`` (read on any connection)."""
    return {table: int(last) for table, last in rows}


def catch_up(conn: sqlite3.Connection, pending: Pending | None = None) -> int:
    """Fold every raw row above the marks into the rollups and move the marks; call inside a
    write transaction. From ``pending`` when it is exactly those rows, else read from the raw
    tables. Returns the number of rows folded."""
    folded = marks(conn)
    top_sql = "SELECT coalesce(max(id), 0) FROM {}"
    tops = {t: int(conn.execute(top_sql.format(t)).fetchone()[0]) for t in FOLDED}
    behind = {t: (folded[t] + 1, tops[t]) for t in FOLDED if tops[t] > folded[t]}
    if not behind:
        return 0
    watermark = day_watermark(conn)
    if pending is not None and pending.exact and pending.ids == behind:
        _upsert(conn, pending.all_parts(), watermark)
    else:
        for table, (first, last) in behind.items():
            _fold_from_table(conn, table, first, last, watermark)
    conn.executemany(
        "UPDATE rollup_folded SET last_id = ? WHERE raw_table = ?",
        [(last, table) for table, (_, last) in behind.items()],
    )
    return sum(last - first + 1 for first, last in behind.values())


def _upsert(conn: sqlite3.Connection, parts: Sequence[Part], watermark: int) -> None:
    if not rollups.has_cubes(parts):
        return
    for cube, level, rows in rollups.updates(parts, watermark):
        conn.executemany(_UPSERT[(cube.name, level)], rows)


def _fold_from_table(
    conn: sqlite3.Connection, table: str, first: int, last: int, watermark: int
) -> None:
    """Fold the rows of ``table`` with ids in ``[first, last]``, read back in chunks (the ids of
    deleted rows simply have no row)."""
    kind = _KIND_OF[table]
    names = ", ".join(schema.FAMILY[kind].names)
    sql = f"SELECT id, {names} FROM {table} WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?"
    start = first
    while start <= last:
        chunk = conn.execute(sql, (start, last, _READ_CHUNK)).fetchall()
        if not chunk:
            return
        _upsert(conn, [{kind: [row[1:] for row in chunk]}], watermark)
        start = chunk[-1][0] + 1


def after_delete(conn: sqlite3.Connection, table: str) -> None:
    """After raw rows of ``table`` were deleted (everything folded first): no mark above the
    table's last id, so that a new row reusing a deleted row's id is above it too."""
    if table in FOLDED:
        conn.execute(
            "UPDATE rollup_folded SET last_id = min(last_id, "
            f"(SELECT coalesce(max(id), 0) FROM {table})) WHERE raw_table = ?",
            (table,),
        )


# -- compaction and retention ------------------------------------------------------------------


def _compact_sql(cube: Cube) -> str:
    upsert = _UPSERT[(cube.name, "day")]
    conflict = upsert[upsert.index(" ON CONFLICT") :]
    if "hour" not in cube.levels:
        return _from_raw_sql(cube, "day", "ts >= ? AND ts < ?") + conflict
    values = [f"{merge_function(c)}({c})" for c in cube.state_columns]
    dims = ", ".join(cube.dims)
    return (
        f"INSERT INTO {cube.table('day')} (bucket, {dims}, {', '.join(cube.state_columns)})"
        f" SELECT bucket / {DAY_MS} * {DAY_MS}, {dims}, {', '.join(values)} FROM "
        f"{cube.table('hour')}"
        f" WHERE bucket >= ? AND bucket < ? GROUP BY {dims}{conflict}"
    )


_COMPACT = {cube.name: _compact_sql(cube) for cube in rollups.CUBES}


def compact(conn: sqlite3.Connection, now_ms: int, pending: Pending | None = None) -> int:
    """Fill the day tables for every complete day past the watermark, one transaction per day;
    return the number of days compacted. Each transaction folds first (``pending``: the
    caller's unfolded rows): a day is compacted from hour tables that hold all of its rows."""
    today = now_ms // DAY_MS * DAY_MS
    done = 0
    while (day := day_watermark(conn)) < today:
        with write_transaction(conn):
            catch_up(conn, pending)
            pending = None
            if day_watermark(conn) == day:
                for cube in rollups.CUBES:
                    conn.execute(_COMPACT[cube.name], (day, day + DAY_MS))
                conn.execute(
                    "UPDATE rollup_watermark SET until_ms = ? WHERE name = 'day'", (day + DAY_MS,)
                )
        done += 1
    return done


def delete_expired_chunk(conn: sqlite3.Connection, table: str, before_ms: int, limit: int) -> int:
    """Delete about ``limit`` rows (whole buckets) of rollup ``table`` older than ``before_ms``."""
    if table not in rollups.TABLES:
        raise ValueError(f"unknown rollup table {table!r}")
    row = conn.execute(
        f"SELECT bucket FROM {table} WHERE bucket < ? ORDER BY bucket LIMIT 1 OFFSET ?",
        (before_ms, limit - 1),
    ).fetchone()
    upto = before_ms if row is None else row[0] + 1
    return int(conn.execute(f"DELETE FROM {table} WHERE bucket < ?", (upto,)).rowcount)


def count_expired(conn: sqlite3.Connection, table: str, before_ms: int) -> int:
    if table not in rollups.TABLES:
        raise ValueError(f"unknown rollup table {table!r}")
    return int(
        conn.execute(f"SELECT count(*) FROM {table} WHERE bucket < ?", (before_ms,)).fetchone()[0]
    )


# -- reads -------------------------------------------------------------------------------------


def segment_sql(
    cube: Cube, q: Query, level: str, lo: int, hi: int, above_id: int | None = None
) -> tuple[str, tuple[Any, ...], int]:
    """The SELECT of one segment's states ``(*key, *state)`` grouped by key: from a rollup
    table, or from the raw rows (``level`` raw) aggregated the same way; ``above_id`` (raw
    only) takes just the rows above that id, by the rowid rather than the time index. Also its
    parameters and the key length."""
    if level == "raw":
        table, time_col = RAW_TABLE[q.kind], "ts"
        values = [*_keys_sql(q.group), *_values_sql(cube)]
    else:
        table, time_col = cube.table(level), "bucket"
        values = [*q.group, *(f"{merge_function(c)}({c})" for c in cube.state_columns)]
    t = f"{time_col} / {int(q.series_ms)} * {int(q.series_ms)}" if q.series_ms else "0"
    # Filter column names come from the cubes' fixed dimension lists; values are bound.
    where = "".join(f" AND {column} = ?" for column in q.filters) + rollups.present_sql(q)
    keylen = 1 + len(q.group)
    params: tuple[int, ...]
    if above_id is None:
        span, params = f"{time_col} >= ? AND {time_col} < ?", (lo, hi)
    else:  # ``+ts``: not through the time index, which would scan the whole range
        span, params = "id > ? AND +ts >= ? AND +ts < ?", (above_id, lo, hi)
    sql = (
        f"SELECT {t}, {', '.join(values)} FROM {table} WHERE {span}{where}"
        f" GROUP BY {', '.join(str(i + 1) for i in range(keylen))}"
    )
    return sql, (*params, *q.filters.values()), keylen


def read_plan(
    shape: Any, q: Query, segments: Sequence[tuple[str, int, int]], folded: dict[str, int]
) -> list[tuple[str, tuple[Any, ...], int]]:
    """The statements that answer ``q``: one per segment, and for the rollup segments (they
    form one span between the raw ends) the raw rows not folded yet (``catch_up``)."""
    plan = [segment_sql(shape.cube, q, level, lo, hi) for level, lo, hi in segments]
    stored = [(lo, hi) for level, lo, hi in segments if level != "raw"]
    if stored:
        lo, hi = min(s[0] for s in stored), max(s[1] for s in stored)
        plan.append(segment_sql(shape.cube, q, "raw", lo, hi, folded[RAW_TABLE[q.kind]]))
    return plan


def aggregate(conn: sqlite3.Connection, q: Query) -> Aggregate:
    """``Reader.aggregate`` on a plain connection (the CLI's report and tools), in one read
    transaction unless the caller holds one."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        shape, source = rollups.query_shape(q)
        watermark = day_watermark(conn) if source == "rollup" else None
        segments, source = rollups.query_segments(q, source, shape, watermark)
        folded = marks(conn) if source == "rollup" else {}
        out: dict[tuple[Any, ...], list[Any]] = {}
        for sql, params, keylen in read_plan(shape, q, segments, folded):
            rollups.fold(shape, conn.execute(sql, params), keylen, out)
        rollups.finish(shape, out)
    finally:
        if own:
            conn.execute("COMMIT")
    return shape.cube, out, source
