"""The SQLite SQL of the rollups: table creation and backfill (migrations 2, 4 and 5), the upserts
of each commit, compaction, retention and the reads of a query range.

What is aggregated, how states merge and how a range is split is shared by every backend
(``storage/rollups.py``); only the SQL is here. Table and column names come from the cubes'
fixed lists, never from input; values are bound.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from metrics_service.storage import rollups
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


def maintain(conn: sqlite3.Connection, parts: Sequence[dict[str, list[tuple[Any, ...]]]]) -> None:
    """Add the rows being inserted to the rollups (``rollups.updates``); call inside the insert's
    transaction so that rollups and raw rows commit or roll back together."""
    if not rollups.has_cubes(parts):
        return
    for cube, level, rows in rollups.updates(parts, day_watermark(conn)):
        conn.executemany(_UPSERT[(cube.name, level)], rows)


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


def compact(conn: sqlite3.Connection, now_ms: int) -> int:
    """Fill the day tables for every complete day past the watermark, one transaction per day;
    return the number of days compacted."""
    today = now_ms // DAY_MS * DAY_MS
    done = 0
    while (day := day_watermark(conn)) < today:
        with write_transaction(conn):
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
    cube: Cube, q: Query, level: str, lo: int, hi: int
) -> tuple[str, tuple[Any, ...], int]:
    """The SELECT of one segment's states ``(*key, *state)`` grouped by key: from a rollup
    table, or from the raw rows (``level`` raw) aggregated the same way. Also its parameters and
    the key length."""
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
    sql = (
        f"SELECT {t}, {', '.join(values)} FROM {table}"
        f" WHERE {time_col} >= ? AND {time_col} < ?{where}"
        f" GROUP BY {', '.join(str(i + 1) for i in range(keylen))}"
    )
    return sql, (lo, hi, *q.filters.values()), keylen


def aggregate(conn: sqlite3.Connection, q: Query) -> Aggregate:
    """``Reader.aggregate`` on a plain connection (the CLI's report and tools)."""
    shape, source = rollups.query_shape(q)
    watermark = day_watermark(conn) if source == "rollup" else None
    segments, source = rollups.query_segments(q, source, shape, watermark)
    out: dict[tuple[Any, ...], list[Any]] = {}
    for level, lo, hi in segments:
        sql, params, keylen = segment_sql(shape.cube, q, level, lo, hi)
        rollups.fold(shape, conn.execute(sql, params), keylen, out)
    rollups.finish(shape, out)
    return shape.cube, out, source
