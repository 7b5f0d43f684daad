"""The rollups' SQL for PostgreSQL. What is aggregated (cubes, states, buckets, the query plan,
the folding of segment results) is ``storage/rollups.py``'s; only the statements are here.

Insert transactions write raw rows only (schema migration 5); the rows are *folded* into the
rollups later, in bulk, by one statement per raw table that aggregates every row above the
table's mark in ``rollup_folded`` and upserts the rollup tables (``fold``). Replicas commit
concurrently, and a transaction can take a lower id than another and commit after it, so a
fold first passes a barrier: it takes the insert lock (``WATERMARK_LOCK``, held shared by every
insert transaction from its start) exclusively for an instant and reads the last id each
sequence handed out. Every row up to those ids is then committed (or rolled back), and the
sequences hand out ids one at a time, so later rows have higher ids: the fold takes the rows
between the mark and that id, and moves the mark, in one transaction. Folds and compaction
are serialised by ``FOLD_LOCK`` (any replica folds; one at a time), so nothing else upserts
rollup rows.

A query reads the rollups, the mark and the raw rows above it in one snapshot, so it is exact
at every moment, folded or not (``aggregate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metrics_service.storage import rollups, schema
from metrics_service.storage.backend import Aggregate
from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.rollups import (
    CUBES,
    DAY_MS,
    HOUR_MS,
    INT_DIMS,
    NBUCKETS,
    Cube,
    Query,
    merge_function,
    missing_value,
    sql_type,
)

#: The insert lock: an advisory lock held shared by every insert transaction from its start,
#: taken exclusively by the fold's barrier and by compaction (no insert is then open).
WATERMARK_LOCK = 0x726F6C6C7570  # "rollup"
#: Serialises folds and compaction across replicas (a fold's holder is the only writer of
#: rollup rows besides retention).
FOLD_LOCK = 0x666F6C64  # "fold"
WATERMARK_SQL = "SELECT until_ms FROM rollup_watermark WHERE name = 'day'"
MARKS_SQL = "SELECT table_name, until_id FROM rollup_folded"
MARK_SQL = "SELECT until_id FROM rollup_folded WHERE table_name = $1"
#: The barrier's function (schema migration 5): the last id of each of ``TABLES``.
BARRIER_FUNCTION = "metrics_fold_barrier"
TABLES = schema.TABLES
TABLE_OF_TYPE = schema.TABLE_OF_TYPE


def _combine(column: str, table: str) -> str:
    if column.endswith("_min"):
        return f"{column} = LEAST({table}.{column}, excluded.{column})"
    if column.endswith("_max"):
        return f"{column} = GREATEST({table}.{column}, excluded.{column})"
    return f"{column} = {table}.{column} + excluded.{column}"


def conflict(cube: Cube, level: str) -> str:
    table = cube.table(level)
    updates = ", ".join(_combine(c, table) for c in cube.state_columns)
    return f" ON CONFLICT (bucket, {', '.join(cube.dims)}) DO UPDATE SET {updates}"


def _keys_sql(dims: Sequence[str]) -> list[str]:
    return [f"coalesce({d}, {missing_value(d)!r})" for d in dims]


#: The latency bounds negated, ascending (``_bucket_sql``).
_NEGATED = "ARRAY[" + ", ".join(repr(-b) for b in reversed(rollups.BOUNDS_MS)) + "]::float8[]"


def _bucket_sql(column: str) -> str:
    """The latency bucket of ``column`` (0 up to the first bound, inclusive; ``NBUCKETS - 1``
    above the last), as ``{column}_b``: the bounds below the value counted, as the number of
    negated bounds at or below the negated value subtracted from their count (``width_bucket``
    counts the bounds at or below its operand; ours are inclusive above)."""
    return f"{NBUCKETS - 1} - width_bucket(-{column}, {_NEGATED}) AS {column}_b"


def _values_sql(cube: Cube) -> list[str]:
    """Aggregates of raw rows into a state, in ``state_columns`` order (as SQLite's)."""
    values = [
        "count(*)",
        "coalesce(sum(value), 0)::float8",
        *(f"coalesce(sum({c}), 0)::float8" for c in cube.sums),
    ]
    bounds = rollups.BOUNDS_MS
    for h in cube.hists:
        values += [f"count({h})", f"coalesce(sum({h}), 0)::float8", f"min({h})", f"max({h})"]
        for i in range(NBUCKETS):
            if i == 0:
                test = f"{h} <= {bounds[0]!r}"
            elif i < NBUCKETS - 1:
                test = f"{h} > {bounds[i - 1]!r} AND {h} <= {bounds[i]!r}"
            else:
                test = f"{h} > {bounds[-1]!r}"
            values.append(f"count(CASE WHEN {test} THEN 1 END)")
    return values


def _merged_sql(cube: Cube) -> list[str]:
    """Aggregates of rollup rows into a state (PostgreSQL's sum of bigint is numeric: cast)."""
    values = []
    for c in cube.state_columns:
        function = merge_function(c)
        if function != "sum":
            values.append(f"{function}({c})")
        elif sql_type(c) == "real":
            values.append(f"sum({c})::float8")
        else:
            # sum(bigint) accumulates in numeric, several times slower than in float8, which
            # is exact for counts below 2^53.
            values.append(f"sum({c}::float8)::bigint")
    return values


def _compact_sql(cube: Cube) -> str:
    dims = ", ".join(cube.dims)
    columns = f"bucket, {dims}, {', '.join(cube.state_columns)}"
    if "hour" not in cube.levels:
        source = (
            f" SELECT ts / {DAY_MS} * {DAY_MS}, {', '.join(_keys_sql(cube.dims))},"
            f" {', '.join(_values_sql(cube))} FROM {rollups.RAW_TABLE[cube.kind]}"
            f" WHERE ts >= $1 AND ts < $2"
            f" GROUP BY 1, {', '.join(str(i + 2) for i in range(len(cube.dims)))}"
        )
    else:
        source = (
            f" SELECT bucket / {DAY_MS} * {DAY_MS}, {dims}, {', '.join(_merged_sql(cube))}"
            f" FROM {cube.table('hour')} WHERE bucket >= $1 AND bucket < $2 GROUP BY 1, {dims}"
        )
    return f"INSERT INTO {cube.table('day')} ({columns}){source}" + conflict(cube, "day")


COMPACT = {cube.name: _compact_sql(cube) for cube in CUBES}


def _fold_sql(kind: str) -> str:
    """One statement that folds the rows of ``kind``'s raw table with ids in ``($1, $2]``
    into every rollup table of its cubes, as ``rollups.updates`` says: hour tables take every
    row, day tables the rows before the day watermark ``$3`` (late ones; the rest reach them
    through compaction); returns how many rows. The rows are read once, by the id index, and
    grouped once by hour, lateness, the union of the cubes' dimensions and each latency's
    bucket (``g``); each rollup table then sums those groups, far fewer than the rows."""
    table = TABLE_OF_TYPE[kind]
    cubes = [c for c in CUBES if c.kind == kind]
    if not cubes:
        return f"SELECT count(*) FROM {table} WHERE id > $1 AND id <= $2"
    dims = list(dict.fromkeys(d for c in cubes for d in c.dims))
    sums = list(dict.fromkeys(x for c in cubes for x in c.sums))
    hists = list(dict.fromkeys(h for c in cubes for h in c.hists))
    keys = [
        f"ts / {HOUR_MS} * {HOUR_MS} AS hour",
        "ts < $3 AS late",
        *(f"{k} AS {d}" for k, d in zip(_keys_sql(dims), dims, strict=True)),
        *(_bucket_sql(h) for h in hists),
    ]
    states = [
        "count(*) AS n",
        "coalesce(sum(value), 0)::float8 AS calls",
        *(f"coalesce(sum({x}), 0)::float8 AS {x}" for x in sums),
    ]
    for h in hists:
        states += [
            f"count({h}) AS {h}_n",
            f"coalesce(sum({h}), 0)::float8 AS {h}_sum",
            f"min({h}) AS {h}_min",
            f"max({h}) AS {h}_max",
        ]
    grouped = (
        f"g AS MATERIALIZED (SELECT {', '.join(keys + states)} FROM {table}"
        f" WHERE id > $1 AND id <= $2 GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))})"
    )
    upserts = []
    for cube in cubes:
        values = ["sum(n)::bigint", "sum(calls)", *(f"sum({x})" for x in cube.sums)]
        for h in cube.hists:
            values += [f"sum({h}_n)::bigint", f"sum({h}_sum)", f"min({h}_min)", f"max({h}_max)"]
            values += [
                f"coalesce(sum({h}_n) FILTER (WHERE {h}_b = {i}), 0)::bigint"
                for i in range(NBUCKETS)
            ]
        positions = ", ".join(str(i + 2) for i in range(len(cube.dims)))
        columns = f"bucket, {', '.join(cube.dims)}, {', '.join(cube.state_columns)}"
        for level in cube.levels:
            width = rollups.LEVELS[level]
            late = " WHERE late" if level == "day" else ""
            upserts.append(
                f"{cube.name}_{level} AS (INSERT INTO {cube.table(level)} ({columns})"
                f" SELECT hour / {width} * {width}, {', '.join(cube.dims)}, {', '.join(values)}"
                f" FROM g{late} GROUP BY 1, {positions}{conflict(cube, level)})"
            )
    return f"WITH {grouped}, {', '.join(upserts)} SELECT coalesce(sum(n), 0) FROM g"


def last_id_sql(table: str) -> str:
    """The last id ``table``'s sequence handed out (0: none yet)."""
    return (
        f"(SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {table}_id_seq)"
    )


#: raw table -> its fold mark and the last id its sequence handed out (every row a snapshot
#: taken before sees has an id at or below it).
TAIL_SQL = {
    table: f"SELECT until_id, {last_id_sql(table)} FROM rollup_folded WHERE table_name = $1"
    for table in TABLES
}
#: raw table -> its fold statement (``$3`` unused by the families without cubes: they count
#: the rows of the id range).
FOLD = {table: _fold_sql(kind) for kind, table in TABLE_OF_TYPE.items()}


async def last_ids(conn: Conn) -> dict[str, int]:
    """The barrier: the last id of each raw table once no insert transaction is open (waits
    for the open ones; inserts starting meanwhile wait for it, an instant). Outside a
    transaction the lock is released as the call returns; inside one, when it ends."""
    values = await conn.fetchval(f"SELECT {BARRIER_FUNCTION}()")
    return dict(zip(TABLES, (int(v) for v in values), strict=True))


async def fold(conn: Conn, last: dict[str, int], watermark: int | None = None) -> int:
    """In the caller's transaction, holding ``FOLD_LOCK``: fold each raw table's rows from its
    mark up to ``last`` (``last_ids``) and move the marks; the rows folded."""
    # Hash the groups: sorting by a dozen text keys under the database's collation took
    # three times as long (the planner expects about one group per row).
    await conn.execute("SET LOCAL enable_sort = off")
    marks = {name: int(mark) for name, mark in await conn.fetch(MARKS_SQL)}
    if watermark is None:
        watermark = int(await conn.fetchval(WATERMARK_SQL))
    done = 0
    for table, hi in last.items():
        lo = marks[table]
        if hi <= lo:
            continue
        sql = FOLD[table]
        args = (lo, hi, watermark) if "$3" in sql else (lo, hi)
        done += int(await conn.fetchval(sql, *args))
        await conn.execute(
            "UPDATE rollup_folded SET until_id = $2 WHERE table_name = $1", table, hi
        )
    return done


async def compact(conn: Conn, now_ms: int) -> int:
    """Fill the day tables for every complete day past the watermark, one transaction per day."""
    today = now_ms // DAY_MS * DAY_MS
    done = 0
    while int(await conn.fetchval(WATERMARK_SQL)) < today:
        async with conn.transaction():
            # No fold, then no insert open: the day's rows are all folded first (a day-only
            # cube is compacted from the raw rows, which a later fold would add again).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", FOLD_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WATERMARK_LOCK)
            day = int(await conn.fetchval(WATERMARK_SQL))
            if day >= today:
                return done
            await fold(conn, await last_ids(conn), day)
            for cube in CUBES:
                await conn.execute(COMPACT[cube.name], day, day + DAY_MS)
            await conn.execute(
                "UPDATE rollup_watermark SET until_ms = $1 WHERE name = 'day'", day + DAY_MS
            )
        done += 1
    return done


def segment_sql(cube: Cube, q: Query, level: str, above: bool = False) -> tuple[str, int]:
    """The SELECT of one segment's states ``(*key, *state)`` grouped by key (``$1``, ``$2``:
    the range; then the filter values), and the key length. ``above`` (raw only): just the
    rows with ids above the fold mark and up to the last id handed out (the last two
    parameters), read by the id index, not the time index, which would read the whole range.
    (Bounded on both sides, the range is estimated small even before statistics exist;
    ``id > mark`` alone was estimated at a third of the table and read it whole.)"""
    if level == "raw":
        table, time_col = rollups.RAW_TABLE[q.kind], "ts"
        values = [*_keys_sql(q.group), *_values_sql(cube)]
    else:
        table, time_col = cube.table(level), "bucket"
        values = [*q.group, *_merged_sql(cube)]
    series = int(q.series_ms) if q.series_ms else 0
    t = f"{time_col} / {series} * {series}" if series else "0::bigint"
    # Column names come from the cubes' fixed dimension lists; values are bound.
    where = "".join(f" AND {column} = ${i + 3}" for i, column in enumerate(q.filters))
    where += rollups.present_sql(q)
    keylen = 1 + len(q.group)
    head = ""
    if above:
        k = len(q.filters) + 3
        head = f"WITH r AS MATERIALIZED (SELECT * FROM {table} WHERE id > ${k} AND id <= ${k + 1}) "
        table = "r"
    sql = (
        f"{head}SELECT {t}, {', '.join(values)} FROM {table}"
        f" WHERE {time_col} >= $1 AND {time_col} < $2{where}"
        f" GROUP BY {', '.join(str(i + 1) for i in range(keylen))}"
    )
    return sql, keylen


async def aggregate(conn: Conn, q: Query) -> Aggregate:
    """``Reader.aggregate`` on PostgreSQL: the shared plan and folding, this dialect's SQL."""
    shape, source = rollups.query_shape(q)
    watermark = int(await conn.fetchval(WATERMARK_SQL)) if source == "rollup" else None
    segments, source = rollups.query_segments(q, source, shape, watermark)
    out: dict[tuple[Any, ...], list[Any]] = {}
    for level, lo, hi in segments:
        sql, keylen = segment_sql(shape.cube, q, level)
        rows = await conn.fetch(sql, lo, hi, *q.filters.values())
        rollups.fold(shape, (tuple(r) for r in rows), keylen, out)
    stored = [(lo, hi) for level, lo, hi in segments if level != "raw"]
    table = rollups.RAW_TABLE[q.kind]
    tail = await conn.fetchrow(TAIL_SQL[table], table) if stored else None
    mark, last = (int(tail[0]), int(tail[1])) if tail is not None else (0, 0)
    if last > mark:  # the rollup segments form one span; its raw rows not folded yet
        sql, keylen = segment_sql(shape.cube, q, "raw", above=True)
        lo, hi = min(s[0] for s in stored), max(s[1] for s in stored)
        rows = await conn.fetch(sql, lo, hi, *q.filters.values(), mark, last)
        rollups.fold(shape, (tuple(r) for r in rows), keylen, out)
    rollups.finish(shape, out)
    return shape.cube, out, source


__all__ = ["FOLD_LOCK", "INT_DIMS", "WATERMARK_LOCK", "aggregate", "compact", "fold", "last_ids"]
