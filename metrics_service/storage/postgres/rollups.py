"""The rollups' SQL for PostgreSQL. What is aggregated (cubes, states, buckets, the query plan,
the folding of segment results) is ``storage/rollups.py``'s; only the statements are here.

Upserts lock rollup rows; two replicas adding to the same rows in different orders could
deadlock, so every writer upserts tables in ``CUBES`` order and rows sorted by key (and a
deadlock that happens anyway retries the transaction: ``backend.insert_batches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metrics_service.storage import rollups
from metrics_service.storage.backend import Aggregate
from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.rollups import (
    CUBES,
    DAY_MS,
    INT_DIMS,
    NBUCKETS,
    Cube,
    Query,
    merge_function,
    missing_value,
    sql_type,
)

#: A shared advisory lock held by every insert transaction and taken exclusively by compaction:
#: a day is compacted only when no insert that read the old watermark is still open.
WATERMARK_LOCK = 0x726F6C6C7570  # "rollup"
WATERMARK_SQL = "SELECT until_ms FROM rollup_watermark WHERE name = 'day'"
#: Rollup tables in the one order every writer follows.
ROLLUP_KEYS = tuple((cube.name, level) for cube in CUBES for level in cube.levels)


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


def upserts(
    parts: Sequence[dict[str, list[tuple[Any, ...]]]], watermark: int
) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    """The rows inserting ``parts`` adds to each rollup table (``ROLLUP_KEYS``), each table's
    rows sorted by key (the one order of every writer). The ingest function (migration 3)
    upserts them with ``conflict``'s clause, inside the insert's transaction."""
    writes: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for cube, level, rows in rollups.updates(parts, watermark):
        width = 1 + len(cube.dims)
        writes[(cube.name, level)] = sorted(rows, key=lambda r: r[:width])
    return writes


async def compact(conn: Conn, now_ms: int) -> int:
    """Fill the day tables for every complete day past the watermark, one transaction per day."""
    today = now_ms // DAY_MS * DAY_MS
    done = 0
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WATERMARK_LOCK)
            day = int(await conn.fetchval(WATERMARK_SQL))
            if day >= today:
                return done
            for cube in CUBES:
                await conn.execute(COMPACT[cube.name], day, day + DAY_MS)
            await conn.execute(
                "UPDATE rollup_watermark SET until_ms = $1 WHERE name = 'day'", day + DAY_MS
            )
        done += 1


def segment_sql(cube: Cube, q: Query, level: str) -> tuple[str, int]:
    """The SELECT of one segment's states ``(*key, *state)`` grouped by key (``$1``, ``$2``:
    the range; then the filter values), and the key length."""
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
    sql = (
        f"SELECT {t}, {', '.join(values)} FROM {table}"
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
    rollups.finish(shape, out)
    return shape.cube, out, source


__all__ = ["INT_DIMS", "WATERMARK_LOCK", "aggregate", "compact", "upserts"]
