"""The rollups' SQL for PostgreSQL. What is aggregated (cubes, states, buckets, the query plan)
is ``storage/rollups.py``'s; only the statements are written here.

Upserts lock rollup rows; two replicas adding to the same rows in different orders could
deadlock, so every writer upserts tables in ``CUBES`` order and rows sorted by key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from metrics_service.storage import rollups
from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.rollups import CUBES, DAY_MS, HOUR_MS, LEVELS, NBUCKETS, Cube, Query

_INT_DIMS = {"success", "healthy"}
#: A shared advisory lock held by every insert transaction and taken exclusively by compaction:
#: a day is compacted only when no insert that read the old watermark is still open.
WATERMARK_LOCK = 0x726F6C6C7570  # "rollup"


def _combine(column: str, table: str) -> str:
    if column.endswith("_min"):
        return f"{column} = LEAST({table}.{column}, excluded.{column})"
    if column.endswith("_max"):
        return f"{column} = GREATEST({table}.{column}, excluded.{column})"
    return f"{column} = {table}.{column} + excluded.{column}"


def _conflict(cube: Cube, level: str) -> str:
    table = cube.table(level)
    updates = ", ".join(_combine(c, table) for c in cube.state_columns)
    return f" ON CONFLICT (bucket, {', '.join(cube.dims)}) DO UPDATE SET {updates}"


def _upsert_sql(cube: Cube, level: str) -> str:
    columns = ["bucket", *cube.dims, *cube.state_columns]
    marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
    return f"INSERT INTO {cube.table(level)} ({', '.join(columns)}) VALUES ({marks})" + _conflict(
        cube, level
    )


UPSERT = {(cube.name, level): _upsert_sql(cube, level) for cube in CUBES for level in cube.levels}


def _keys_sql(dims: Sequence[str]) -> list[str]:
    return [f"coalesce({d}, {-1 if d in _INT_DIMS else repr('')})" for d in dims]


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
    """Aggregates of rollup rows into a state (sums stay their column's type)."""
    values = []
    for c in cube.state_columns:
        if c.endswith("_min"):
            values.append(f"min({c})")
        elif c.endswith("_max"):
            values.append(f"max({c})")
        elif c == "calls" or c.endswith("_sum"):
            values.append(f"sum({c})::float8")
        else:
            values.append(f"sum({c})::bigint")
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
    return f"INSERT INTO {cube.table('day')} ({columns}){source}" + _conflict(cube, "day")


COMPACT = {cube.name: _compact_sql(cube) for cube in CUBES}


async def maintain(
    conn: Conn, parts: Sequence[dict[str, list[tuple[Any, ...]]]], *, locked: bool = False
) -> None:
    """Add the rows being inserted to the rollups, inside the insert's transaction (raw rows and
    rollups commit together): hours always, days for the events of days already compacted.
    ``locked``: the transaction already holds the watermark's shared lock."""
    kinds = {kind for part in parts for kind in part}
    if not any(rollups._BY_KIND.get(kind) for kind in kinds):
        return
    if not locked:
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", WATERMARK_LOCK)
    watermark = int(await conn.fetchval("SELECT until_ms FROM rollup_watermark WHERE name = 'day'"))
    writes: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for kind in kinds:
        shapes = rollups._BY_KIND.get(kind, ())
        hourly = tuple(s for s in shapes if "hour" in s.cube.levels)
        daily = [s for s in shapes if "hour" not in s.cube.levels]
        if hourly:
            accs: list[dict[tuple[Any, ...], list[Any]]] = [{} for _ in hourly]
            accumulate = rollups._accumulator(hourly)
            for part in parts:
                rows = part.get(kind)
                if rows:
                    accumulate(rows, HOUR_MS, accs)
            for shape, hours in zip(hourly, accs, strict=True):
                late = {k: st for k, st in hours.items() if k[0] < watermark}
                writes[(shape.cube.name, "hour")] = list(rollups._stored(shape, hours))
                if late:
                    coarse = shape.coarsen(late, DAY_MS)
                    writes[(shape.cube.name, "day")] = list(rollups._stored(shape, coarse))
        late_rows = (
            [r for part in parts for r in part.get(kind, ()) if r[0] < watermark] if daily else []
        )
        for shape in daily if late_rows else ():
            days: dict[tuple[Any, ...], list[Any]] = {}
            rollups._accumulator((shape,))(late_rows, DAY_MS, [days])
            writes[(shape.cube.name, "day")] = list(rollups._stored(shape, days))
    for cube in CUBES:
        for level in cube.levels:
            rows = writes.get((cube.name, level))
            if rows:
                width = 1 + len(cube.dims)
                rows.sort(key=lambda r: r[:width])
                await conn.executemany(UPSERT[(cube.name, level)], rows)


async def compact(conn: Conn, now_ms: int) -> int:
    """Fill the day tables for every complete day past the watermark, one transaction per day."""
    today = now_ms // DAY_MS * DAY_MS
    done = 0
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WATERMARK_LOCK)
            day = int(
                await conn.fetchval(
                    "SELECT until_ms FROM rollup_watermark WHERE name = 'day' FOR UPDATE"
                )
            )
            if day >= today:
                return done
            for cube in CUBES:
                await conn.execute(COMPACT[cube.name], day, day + DAY_MS)
            await conn.execute(
                "UPDATE rollup_watermark SET until_ms = $1 WHERE name = 'day'", day + DAY_MS
            )
        done += 1


async def aggregate(conn: Conn, q: Query) -> tuple[Cube, dict[tuple[Any, ...], list[Any]], str]:
    """``rollups.aggregate`` on PostgreSQL: the same plan, the same states."""
    dims = (*q.group, *q.filters)
    cube = rollups.cube_for(q.kind, dims)
    if cube is not None:
        shape = rollups._SHAPES[cube.name]
        source = "rollup"
        watermark = int(
            await conn.fetchval("SELECT until_ms FROM rollup_watermark WHERE name = 'day'")
        )
        segments = rollups.plan(cube, q.since_ms, q.until_ms, watermark, q.series_ms)
    else:
        family = next(c for c in CUBES if c.kind == q.kind)
        cube = Cube(family.name, q.kind, tuple(dict.fromkeys(dims)), family.sums, family.hists)
        shape = rollups._Shape(cube)
        source = "raw"
        segments = [("raw", q.since_ms, q.until_ms)]
    if all(level == "raw" for level, _, _ in segments):
        source = "raw"
    out: dict[tuple[Any, ...], list[Any]] = {}
    for level, lo, hi in segments:
        await _segment(conn, shape, q, level, lo, hi, out)
    for st in out.values():
        for i in shape.mins:
            if st[i] == math.inf:
                st[i] = st[i + 1] = None
    return cube, out, source


async def _segment(
    conn: Conn,
    shape: Any,
    q: Query,
    level: str,
    lo: int,
    hi: int,
    out: dict[tuple[Any, ...], list[Any]],
) -> None:
    cube = shape.cube
    if level == "raw":
        table, time_col = rollups.RAW_TABLE[q.kind], "ts"
        values = [*_keys_sql(q.group), *_values_sql(cube)]
    else:
        assert level in LEVELS
        table, time_col = cube.table(level), "bucket"
        values = [*q.group, *_merged_sql(cube)]
    series = int(q.series_ms) if q.series_ms else 0
    t = f"{time_col} / {series} * {series}" if series else "0::bigint"
    # Column names come from the cubes' fixed dimension lists; values are bound.
    where = "".join(f" AND {column} = ${i + 3}" for i, column in enumerate(q.filters))
    keylen = 1 + len(q.group)
    sql = (
        f"SELECT {t}, {', '.join(values)} FROM {table}"
        f" WHERE {time_col} >= $1 AND {time_col} < $2{where}"
        f" GROUP BY {', '.join(str(i + 1) for i in range(keylen))}"
    )
    for record in await conn.fetch(sql, lo, hi, *q.filters.values()):
        row = tuple(record)
        key = row[:keylen]
        st = list(row[keylen:])
        for i in shape.mins:
            if st[i] is None:
                st[i], st[i + 1] = math.inf, -math.inf
        have = out.get(key)
        if have is None:
            out[key] = st
        else:
            shape.merge(have, st)
