"""PostgreSQL rollups read and written in bulk: a query for the events that have a dimension
(``Query.present``) answers what grouping by it and merging the groups that have it answers, on
both backends, from day and hour rollups and from raw rows; the bench's bulk load
(``bench/postgres_analytics.py``'s ``add_raw``) leaves rollups equal to the raw rows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bench.postgres_analytics import add_raw
from metrics_service import Settings, storage
from metrics_service.storage import rollups
from metrics_service.storage.postgres import Backend
from metrics_service.storage.postgres import rollups as pg_rollups
from metrics_service.storage.rollups import DAY_MS, HOUR_MS, Query
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from metrics_service.validation import Validator
from tests._analytics_seed import seed_rows

Parts = list[dict[str, list[tuple[Any, ...]]]]
#: Filters that pick each cube holding the tool: tools, tenants, tool_clients, and none (raw).
FILTERS: list[dict[str, str | int]] = [
    {},
    {"tenant_id": "acme"},
    {"client_name": "cursor"},
    {"client_name": "cursor", "tenant_id": "acme"},
]


def history(settings: Settings) -> tuple[int, Parts]:
    """The analytics seed and calls that name no tool (``tools/list``), some in the same hours
    as tool calls, some failed."""
    now, parts = seed_rows(settings)
    untooled = [
        {
            "type": "tool_execution",
            "timestamp": now - 600 - i * 4_321.0,
            "duration_ms": 3.0 + i,
            "dimensions": {
                "method": "tools/list",
                "client_name": "cursor",
                "success": i % 4 != 0,
            },
            "metadata": {"tenant_id": "acme", "input_tokens": 7},
        }
        for i in range(60)
    ]
    body = {"service": "svc", "version": "1", "metrics": untooled}
    batch = Validator(settings).decode(json.dumps(body).encode())
    assert not batch.rejections
    return int(now * 1000), [*parts, batch.rows]


def _norm(states: dict[tuple[Any, ...], list[Any]]) -> dict[tuple[Any, ...], list[Any]]:
    return {k: [round(v, 6) if isinstance(v, float) else v for v in st] for k, st in states.items()}


def _without_tool(cube: rollups.Cube, grouped: dict[tuple[Any, ...], list[Any]]) -> Any:
    """States by (time, tool, success) -> by (time, success), over the calls naming a tool."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for (t, tool, success), st in grouped.items():
        if tool == "":
            continue
        have = out.get((t, success))
        if have is None:
            out[(t, success)] = list(st)
        else:
            rollups.merge(cube, have, st)
    return _norm(out)


def _queries(now_ms: int) -> list[tuple[Query, Query]]:
    """(with ``present``, grouped by the tool instead) over ragged and whole ranges, totals and
    hour and minute series (a minute series reads only raw rows)."""
    ranges = [
        (now_ms - 4 * DAY_MS, now_ms),
        (now_ms - 2 * DAY_MS + 17 * 60_000, now_ms - 5 * HOUR_MS - 3 * 60_000),
    ]
    out = []
    for lo, hi in ranges:
        for filters in FILTERS:
            for series in (None, HOUR_MS, 60_000):
                kind = "tool_execution"
                out.append(
                    (
                        Query(kind, lo, hi, ("success",), filters, series, ("tool_name",)),
                        Query(kind, lo, hi, ("tool_name", "success"), filters, series),
                    )
                )
    return out


def test_present_answers_the_groups_that_have_the_dimension_on_both_backends(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now_ms, parts = history(settings)
    since = now_ms // DAY_MS * DAY_MS - 4 * DAY_MS  # as if started four days ago: day rollups
    conn, _ = storage.open_database(settings.db_path)
    conn.execute("UPDATE rollup_watermark SET until_ms = ?", (since,))
    for part in parts:
        storage.insert_rows(conn, [part])
    assert sqlite_rollups.compact(conn, now_ms) == 4
    sqlite = []
    for present, grouped in _queries(now_ms):
        cube, states, _ = sqlite_rollups.aggregate(conn, present)
        by_tool, by_tool_states, _ = sqlite_rollups.aggregate(conn, grouped)
        assert cube.state_columns == by_tool.state_columns
        sqlite.append((_norm(states), _without_tool(by_tool, by_tool_states)))

    async def body(b: Backend) -> tuple[list[tuple[Any, Any, str]], int]:
        await b.execute("UPDATE rollup_watermark SET until_ms = $1", since)
        for part in parts:
            await b.insert_batches([part])
        days = await b.compact_rollups(now_ms)

        async def view(reader: Any) -> list[tuple[Any, Any, str]]:
            out = []
            for present, grouped in _queries(now_ms):
                _, states, source = await reader.aggregate(present)
                out.append(
                    (_norm(states), _without_tool(*(await reader.aggregate(grouped))[:2]), source)
                )
            return out

        return await b.analytics(view), days

    postgres, days = asyncio.run(_with_backend(postgres_url, body))
    assert days == 4
    sources = {source for _, _, source in postgres}
    assert sources == {"rollup", "raw"}
    for (pg_present, pg_grouped, _), (lite_present, lite_grouped) in zip(
        postgres, sqlite, strict=True
    ):
        assert pg_present == pg_grouped
        assert lite_present == lite_grouped
        assert pg_present == lite_present
    # Calls without a tool were there to be left out (all inside the 4 days), and calls with one
    # remain under every filter.
    tool = rollups.row_positions("tool_execution")["tool_name"]
    untooled = sum(r[tool] is None for part in parts for r in part.get("tool_execution", ()))
    every = Query("tool_execution", now_ms - 4 * DAY_MS, now_ms, ("success",))
    with_tool = [sqlite_rollups.aggregate(conn, q)[1] for q, _ in _queries(now_ms)[::3]]
    assert untooled == 61
    assert sum(st[0] for st in sqlite_rollups.aggregate(conn, every)[1].values()) == untooled + sum(
        st[0] for st in with_tool[0].values()
    )
    assert all(with_tool)
    conn.close()


async def _with_backend(url: str, body: Any) -> Any:
    backend = Backend(None, url)
    await backend.open()
    try:
        return await body(backend)
    finally:
        await backend.close()


def _from_raw(cube: rollups.Cube, level: str) -> Query:
    return Query(cube.kind, 0, 2**62, cube.dims, series_ms=rollups.LEVELS[level])


def test_bulk_load_leaves_every_rollup_equal_to_the_raw_rows(
    postgres_url: str, tmp_path: Path
) -> None:
    now_ms, parts = history(Settings(db_path=tmp_path / "m.db"))

    async def body(b: Backend) -> tuple[int, int, dict[str, Any]]:
        # The watermark starts at today (migration 1): older rows are late, into the day tables.
        watermark = int((await b.execute(pg_rollups.WATERMARK_SQL))[0][0])
        async with b._conn("test") as conn:
            stored = await add_raw(b, conn, parts)
        tables: dict[str, Any] = {}
        for cube in rollups.CUBES:
            for level in cube.levels:
                q = _from_raw(cube, level)
                table_sql, keylen = pg_rollups.segment_sql(cube, q, level)
                raw_sql, _ = pg_rollups.segment_sql(cube, q, "raw")
                hi = 2**62 if level == "hour" else watermark
                tables[cube.table(level)] = [
                    _norm(dict(_states(cube, await b.execute(sql, 0, hi), keylen)))
                    for sql in (table_sql, raw_sql)
                ]
        return stored, watermark, tables

    stored, watermark, tables = asyncio.run(_with_backend(postgres_url, body))
    assert stored == sum(len(rows) for part in parts for rows in part.values())
    assert watermark > now_ms - DAY_MS
    for table, (rolled, raw) in tables.items():
        assert rolled == raw, table
    filled = {t for t, (rolled, _) in tables.items() if rolled}
    kinds = {kind for part in parts for kind, rows in part.items() if rows}
    assert filled == {
        cube.table(level) for cube in rollups.CUBES if cube.kind in kinds for level in cube.levels
    }


def _states(
    cube: rollups.Cube, rows: list[tuple[Any, ...]], keylen: int
) -> dict[tuple[Any, ...], list[Any]]:
    out: dict[tuple[Any, ...], list[Any]] = {}
    shape = rollups._shape(cube)
    rollups.fold(shape, rows, keylen, out)
    rollups.finish(shape, out)
    return out
