"""PostgreSQL rollups folded in the background (schema migration 5), against a real
PostgreSQL 15: answers are exact before and after each fold; a transaction that took a lower
id and commits after a higher one is folded exactly once (the fold's barrier waits for it);
replicas inserting and folding at once count every row once, with every answer equal to the
raw rows of its own snapshot; compaction folds first (the day-only cube counts each row once);
retention deletes only rows the rollups hold; migration 5 marks the rows the rollups already
held; ``METRICS_ROLLUP_FOLD_INTERVAL_S=0`` folds before the commit is answered, and ``close``
folds what is left."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from metrics_service import Settings, storage
from metrics_service.storage import rollups, schema
from metrics_service.storage.postgres import Backend
from metrics_service.storage.postgres import partitions as pg_partitions
from metrics_service.storage.postgres import rollups as pg_rollups
from metrics_service.storage.rollups import DAY_MS, HOUR_MS, Query
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from tests._analytics_seed import seed_rows
from tests.test_postgres_backend import _norm
from tests.test_postgres_rollups import _states

T = TypeVar("T")
Parts = list[dict[str, list[tuple[Any, ...]]]]
#: Every tool call, any time: rollup segments, then the raw rows above the mark.
EVERY_CALL = Query("tool_execution", 0, 2**62)


def _queries(now_ms: int) -> list[Query]:
    """Each cube grouped by its dimensions over a ragged range (days, hours and raw ends), and
    hour series (rollup segments only, so the rows above the mark matter)."""
    lo, hi = now_ms - 3 * DAY_MS - 17 * 60_000, now_ms + 60_000
    out = [Query(cube.kind, lo, hi, group=cube.dims) for cube in rollups.CUBES]
    out += [Query(kind, lo, hi, series_ms=HOUR_MS) for kind in rollups.RAW_TABLE]
    return out


async def rollups_against_raw(b: Backend) -> dict[str, tuple[Any, Any]]:
    """Each rollup table's states and the same aggregated from the raw rows: every raw row for
    an hour table, those before the day watermark for a day table (compacted days and late
    events; later days reach the day tables through compaction)."""
    watermark = int((await b.execute(pg_rollups.WATERMARK_SQL))[0][0])
    out = {}
    for cube in rollups.CUBES:
        for level in cube.levels:
            q = Query(cube.kind, 0, 2**62, cube.dims, series_ms=rollups.LEVELS[level])
            table_sql, keylen = pg_rollups.segment_sql(cube, q, level)
            raw_sql, _ = pg_rollups.segment_sql(cube, q, "raw")
            hi = 2**62 if level == "hour" else watermark
            out[cube.table(level)] = (
                _norm(_states(cube, await b.execute(table_sql, 0, hi), keylen)),
                _norm(_states(cube, await b.execute(raw_sql, 0, hi), keylen)),
            )
    return out


async def marks(b: Backend) -> dict[str, int]:
    return {t: int(m) for t, m in await b.execute(pg_rollups.MARKS_SQL)}


async def rolled_calls(b: Backend) -> int:
    """The calls the tools hour table holds (what was folded)."""
    return int((await b.execute("SELECT coalesce(sum(n), 0) FROM rollup_tools_hour"))[0][0])


async def answers(b: Backend, qs: list[Query]) -> list[Any]:
    async def view(reader: Any) -> list[Any]:
        return [_norm((await reader.aggregate(q))[1]) for q in qs]

    return await b.analytics(view)


def with_backend(url: str, body: Callable[[Backend], Awaitable[T]], **settings: Any) -> T:
    async def go() -> T:
        backend = Backend(Settings(**settings) if settings else None, url)
        await backend.open()
        try:
            return await body(backend)
        finally:
            await backend.close()

    return asyncio.run(go())


def sqlite_answers(tmp_path: Path, parts: Parts, qs: list[Query]) -> list[Any]:
    conn, _ = storage.open_database(tmp_path / f"lite-{len(parts)}.db")
    try:
        storage.insert_rows(conn, parts)
        return [_norm(sqlite_rollups.aggregate(conn, q)[1]) for q in qs]
    finally:
        conn.close()


def test_answers_are_exact_before_and_after_each_fold(postgres_url: str, tmp_path: Path) -> None:
    now, parts = seed_rows(Settings(db_path=tmp_path / "m.db"))
    now_ms = int(now * 1000)
    qs = _queries(now_ms)
    half = len(parts) // 2
    expected_half = sqlite_answers(tmp_path, parts[:half], qs)
    expected_all = sqlite_answers(tmp_path, parts, qs)
    rows = sum(len(r) for part in parts for r in part.values())

    async def body(b: Backend) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for part in parts[:half]:
            await b.insert_batches([part])
        seen["unfolded"] = (await answers(b, qs), await rolled_calls(b))
        seen["first fold"] = await b.fold()
        seen["folded"] = (await answers(b, qs), await rolled_calls(b))
        for part in parts[half:]:
            await b.insert_batches([part])
        seen["half folded"] = await answers(b, qs)
        seen["second fold"] = await b.fold()
        seen["again"] = await b.fold()
        seen["all folded"] = await answers(b, qs)
        seen["tables"] = await rollups_against_raw(b)
        seen["marks"] = await marks(b)
        seen["max ids"] = {
            t: int((await b.execute(f"SELECT coalesce(max(id), 0) FROM {t}"))[0][0])
            for t in storage.TABLES
        }
        return seen

    seen = with_backend(postgres_url, body)
    unfolded, nothing = seen["unfolded"]
    assert nothing == 0  # Backend(None, ...) never folds by itself
    assert unfolded == expected_half
    folded, calls = seen["folded"]
    assert folded == expected_half and calls > 0
    assert seen["half folded"] == expected_all
    assert seen["all folded"] == expected_all
    assert seen["first fold"] + seen["second fold"] == rows
    assert seen["again"] == 0
    assert seen["marks"] == seen["max ids"]
    for table, (rolled, raw) in seen["tables"].items():
        assert rolled == raw, table
    assert all(expected_all), "the seed fills every cube"


def _tool_row(ts_ms: int) -> tuple[Any, ...]:
    return (ts_ms, ts_ms, "svc", "1", "tools/call", "t", 1, 2.5)


_RAW_INSERT = (
    "INSERT INTO tool_metrics (ts, received_at, service, service_version, method, tool_name,"
    " success, duration_ms, value) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1)"
)


async def _waiting_for_the_insert_lock(conn: asyncpg.Connection[Any]) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    )


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.01)


def test_a_lower_id_committed_after_a_higher_one_is_folded_exactly_once(
    postgres_url: str,
) -> None:
    """Transaction A takes id 1 and stays open; B takes id 2 and commits. The fold must not
    move the mark past 2 while 1 may still commit: its barrier waits for A, then folds both."""

    async def body(b: Backend) -> dict[str, Any]:
        ts = int(time.time() * 1000)
        seen: dict[str, Any] = {}
        a = await asyncpg.connect(postgres_url)
        watcher = await asyncpg.connect(postgres_url)
        try:
            await a.execute("BEGIN")
            await a.execute("SELECT pg_advisory_xact_lock_shared($1)", pg_rollups.WATERMARK_LOCK)
            await a.execute(_RAW_INSERT, *_tool_row(ts))
            seen["a id"] = await a.fetchval("SELECT max(id) FROM tool_metrics")
            await b.insert_batches([{"tool_execution": [_row(ts + 1)]}])
            seen["b id"] = (await b.execute("SELECT max(id) FROM tool_metrics"))[0][0]
            fold = asyncio.create_task(b.fold())
            await _until(lambda: _waiting_for_the_insert_lock(watcher))
            seen["done while A open"] = fold.done()
            seen["marks while A open"] = await marks(b)
            await a.execute("COMMIT")
            seen["folded"] = await fold
            seen["calls"] = await rolled_calls(b)
            seen["answer"] = await answers(b, [EVERY_CALL])
            seen["again"] = await b.fold()
        finally:
            await a.close()
            await watcher.close()
        return seen

    seen = with_backend(postgres_url, body)
    assert (seen["a id"], seen["b id"]) == (1, 2)
    assert seen["done while A open"] is False
    assert seen["marks while A open"]["tool_metrics"] == 0
    assert seen["folded"] == 2 and seen["again"] == 0
    assert seen["calls"] == 2
    [states] = seen["answer"]
    assert [st[0] for st in states.values()] == [2]


def _row(ts_ms: int, tool: str = "t", success: int = 1) -> tuple[Any, ...]:
    """A tool_execution row as validation builds it (the registry's column order)."""
    names = schema.FAMILY["tool_execution"].names
    values = {
        "ts": ts_ms,
        "received_at": ts_ms,
        "service": "svc",
        "service_version": "1",
        "value": 1.0,
        "duration_ms": 2.5,
        "method": "tools/call",
        "tool_name": tool,
        "success": success,
    }
    return tuple(values.get(n) for n in names)


def test_replicas_inserting_and_folding_at_once_count_every_row_once(postgres_url: str) -> None:
    """Three replicas commit groups of random sizes (the ingest function below 64 rows of a
    family, COPY from there) and fold every 20 ms, all at once; a fourth reads. Every answer
    equals the raw rows of its own snapshot, and at the end every rollup equals the raw rows."""
    rng = random.Random(5)
    now_ms = int(time.time() * 1000)

    async def replica(b: Backend, groups: int) -> int:
        sent = 0
        for _ in range(groups):
            n = rng.choice([1, 3, 70])
            rows = [
                _row(now_ms - rng.randrange(3 * HOUR_MS), f"t{rng.randrange(4)}", rng.randrange(2))
                for _ in range(n)
            ]
            await b.insert_batches([{"tool_execution": rows}])
            sent += n
        return sent

    async def snapshot(reader: Any) -> tuple[int, int, int]:
        """In one snapshot: the calls the answer counts, the raw rows, those not folded."""
        aggregate = await reader.aggregate(EVERY_CALL)
        raw = await reader._conn.fetchval("SELECT count(*) FROM tool_metrics")
        above = await reader._conn.fetchval(
            "SELECT count(*) FROM tool_metrics WHERE id >"
            " (SELECT until_id FROM rollup_folded WHERE table_name = 'tool_metrics')"
        )
        return sum(st[0] for st in aggregate[1].values()), int(raw), int(above)

    async def main() -> dict[str, Any]:
        settings = Settings(rollup_fold_interval_s=0.02)
        replicas = [Backend(settings, postgres_url) for _ in range(3)]
        reader = Backend(None, postgres_url)
        for b in [*replicas, reader]:
            await b.open()
        try:
            inserting = asyncio.gather(*(replica(b, 100) for b in replicas))
            reads = []
            while not inserting.done():
                reads.append(await reader.analytics(snapshot))
                await asyncio.sleep(0.005)
            sent = sum(await inserting)
            await reader.fold(wait=True)  # after a replica's fold under way, if any
            return {
                "sent": sent,
                "reads": reads,
                "final": await reader.analytics(snapshot),
                "tables": await rollups_against_raw(reader),
                "calls": await rolled_calls(reader),
            }
        finally:
            for b in [*replicas, reader]:
                await b.close()

    seen = asyncio.run(main())
    assert all(counted == raw for counted, raw, _ in seen["reads"]), seen["reads"]
    # Some answers were part rollups, part raw rows above the mark.
    assert any(0 < above < raw for _, raw, above in seen["reads"]), seen["reads"]
    assert seen["final"] == (seen["sent"], seen["sent"], 0)
    assert seen["calls"] == seen["sent"]
    for table, (rolled, raw) in seen["tables"].items():
        assert rolled == raw, table


def test_compaction_folds_first_so_the_day_only_cube_counts_each_row_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """Rows of past days not folded yet when their days are compacted: a day-only cube (users)
    is compacted from the raw rows, so they must be folded first or the fold would add them
    again. Late rows for a compacted day, after it, are folded into the day tables."""
    now, parts = seed_rows(Settings(db_path=tmp_path / "m.db"))
    now_ms = int(now * 1000)
    today = now_ms // DAY_MS * DAY_MS
    qs = _queries(now_ms)
    expected = sqlite_answers(tmp_path, parts, qs)
    late = [{"auth_request": p["auth_request"]} for p in parts if p.get("auth_request")]

    async def body(b: Backend) -> dict[str, Any]:
        await b.execute("UPDATE rollup_watermark SET until_ms = $1", today - 4 * DAY_MS)
        for part in parts:
            await b.insert_batches([part])
        seen: dict[str, Any] = {"days": await b.compact_rollups(now_ms)}
        seen["fold after"] = await b.fold()
        seen["answers"] = await answers(b, qs)
        seen["tables"] = await rollups_against_raw(b)
        for part in late:  # the same auth events again, their days compacted
            await b.insert_batches([part])
        seen["late folded"] = await b.fold()
        seen["late tables"] = await rollups_against_raw(b)
        return seen

    seen = with_backend(postgres_url, body)
    assert seen["days"] == 4
    assert seen["fold after"] == 0  # compaction folded everything it had
    assert seen["answers"] == expected
    assert seen["late folded"] == sum(len(p["auth_request"]) for p in late) > 0
    for key in ("tables", "late tables"):
        for table, (rolled, raw) in seen[key].items():
            assert rolled == raw, (key, table)
    assert seen["late tables"]["rollup_users_day"][0] != seen["tables"]["rollup_users_day"][0]


def test_retention_deletes_only_rows_the_rollups_hold(postgres_url: str) -> None:
    """Another replica holds the fold lock, so this one cannot fold: retention leaves the
    expired rows that are not folded yet, and deletes them once they are."""
    old = int(time.time() * 1000) - 10 * DAY_MS
    rows = [_row(old + i) for i in range(5)]

    async def body(b: Backend) -> dict[str, Any]:
        await b.insert_batches([{"tool_execution": rows}])
        holder = await asyncpg.connect(postgres_url)
        seen: dict[str, Any] = {}
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", pg_rollups.FOLD_LOCK)
            before = old + DAY_MS
            seen["while held"] = await b.delete_expired("tool_metrics", before, 1000)
            seen["left"] = (await b.execute("SELECT count(*) FROM tool_metrics"))[0][0]
            await holder.execute("SELECT pg_advisory_unlock($1)", pg_rollups.FOLD_LOCK)
            seen["after"] = await b.delete_expired("tool_metrics", before, 1000)
        finally:
            await holder.close()
        seen["left after"] = (await b.execute("SELECT count(*) FROM tool_metrics"))[0][0]
        seen["calls"] = await rolled_calls(b)
        return seen

    seen = with_backend(postgres_url, body)
    assert (seen["while held"], seen["left"]) == (0, 5)
    assert (seen["after"], seen["left after"]) == (5, 0)
    assert seen["calls"] == 5  # the rollups keep what retention took from the raw table


def test_migration_5_marks_the_rows_the_rollups_already_hold(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at version 4 whose rollups hold its rows (written in each insert's
    transaction then): migration 5 sets the marks at the last ids, so no row is folded twice;
    the sequences hand out one id at a time, and the raw tables get their id index."""
    from metrics_service.storage.postgres import migrations

    latest = migrations.MIGRATIONS
    ts = int(time.time() * 1000) // HOUR_MS * HOUR_MS

    async def main() -> dict[str, Any]:
        conn = await asyncpg.connect(postgres_url)
        try:
            monkeypatch.setattr(migrations, "MIGRATIONS", latest[:4])
            assert await migrations.apply(conn) == [1, 2, 3, 4]
            day = ts // DAY_MS * DAY_MS
            await conn.execute(
                f"CREATE TABLE {pg_partitions.name('tool_metrics', day)} PARTITION OF"
                f" tool_metrics FOR VALUES FROM ({day}) TO ({day + DAY_MS})"
            )
            for i in range(3):
                await conn.execute(_RAW_INSERT, *_tool_row(ts + i))
            # What version 4's ingest function upserted with those rows, in their transaction.
            await conn.execute(
                "INSERT INTO rollup_tools_hour (bucket, service, server_name, method, tool_name,"
                " success, n, calls) VALUES ($1, 'svc', '', 'tools/call', 't', 1, 3, 3)",
                ts,
            )
            # Version 4's sequences hand out 64 ids to a session at a time: all are taken.
            handed_out = await conn.fetchval("SELECT last_value FROM tool_metrics_id_seq")
            monkeypatch.setattr(migrations, "MIGRATIONS", latest)
            seen: dict[str, Any] = {"applied": await migrations.apply(conn), "out": handed_out}
            seen["marks"] = dict(await conn.fetch(pg_rollups.MARKS_SQL))
            seen["cache"] = {
                r[0]: r[1]
                for r in await conn.fetch(
                    "SELECT sequencename, cache_size FROM pg_sequences"
                    " WHERE sequencename LIKE '%_id_seq'"
                )
            }
            seen["indexes"] = {
                r[0]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%_id'"
                )
            }
        finally:
            await conn.close()

        async def after(b: Backend) -> None:
            await b.insert_batches([{"tool_execution": [_row(ts + 10)]}])
            seen["folded"] = await b.fold()
            seen["calls"] = await rolled_calls(b)

        backend = Backend(None, postgres_url)
        await backend.open()
        try:
            await after(backend)
        finally:
            await backend.close()
        return seen

    seen = asyncio.run(main())
    assert seen["applied"] == [5]
    assert seen["out"] >= 3
    assert seen["marks"] == {t: (seen["out"] if t == "tool_metrics" else 0) for t in storage.TABLES}
    assert {seen["cache"][f"{t}_id_seq"] for t in storage.TABLES} == {1}
    assert {f"{t}_id" for t in storage.TABLES} <= seen["indexes"]
    assert seen["folded"] == 1  # the new row only
    assert seen["calls"] == 4


def test_interval_zero_folds_before_the_answer_and_close_folds_the_rest(
    postgres_url: str,
) -> None:
    now_ms = int(time.time() * 1000)

    async def every_commit(b: Backend) -> int:
        await b.insert_batches([{"tool_execution": [_row(now_ms), _row(now_ms + 1)]}])
        return await rolled_calls(b)

    async def left_for_close(b: Backend) -> int:
        await b.insert_batches([{"tool_execution": [_row(now_ms + 2)]}])
        return await rolled_calls(b)

    async def after_close(b: Backend) -> tuple[int, dict[str, int]]:
        return await rolled_calls(b), await marks(b)

    assert with_backend(postgres_url, every_commit, rollup_fold_interval_s=0) == 2
    # A minute between folds: the row is not folded when the commit returns...
    assert with_backend(postgres_url, left_for_close, rollup_fold_interval_s=60) == 2
    # ... and closing folded it.
    calls, folded = with_backend(postgres_url, after_close)
    assert calls == 3
    assert folded["tool_metrics"] == 3


def test_a_failed_fold_after_the_commit_does_not_fail_the_request(postgres_url: str) -> None:
    """With ``METRICS_ROLLUP_FOLD_INTERVAL_S=0`` the fold follows each commit: when it cannot
    run (the marks locked by another session past the command timeout), the committed rows
    are still acknowledged, answers stay exact, and the next fold takes them."""
    now_ms = int(time.time() * 1000)

    async def main() -> dict[str, Any]:
        b = Backend(Settings(rollup_fold_interval_s=0), postgres_url, command_timeout_s=1.0)
        await b.open()
        holder = await asyncpg.connect(postgres_url)
        seen: dict[str, Any] = {}
        try:
            await holder.execute("BEGIN")
            await holder.execute("LOCK TABLE rollup_folded IN ACCESS EXCLUSIVE MODE")
            seen["stored"] = await b.insert_batches([{"tool_execution": [_row(now_ms)]}])
            await holder.execute("ROLLBACK")
            seen["calls before"] = await rolled_calls(b)
            seen["answer"] = await answers(b, [EVERY_CALL])
            seen["folded"] = await b.fold()
        finally:
            await holder.close()
            await b.close()
        return seen

    seen = asyncio.run(main())
    assert seen["stored"] == 1
    assert seen["calls before"] == 0
    [states] = seen["answer"]
    assert [st[0] for st in states.values()] == [1]
    assert seen["folded"] == 1


def test_a_fold_comes_early_once_enough_rows_wait(postgres_url: str) -> None:
    """A minute between folds, but ``FOLD_MAX_ROWS`` rows committed: the fold comes within the
    check period, not after the minute (a query reads rows not folded yet raw until then)."""
    from metrics_service.storage.postgres.backend import FOLD_MAX_ROWS

    now_ms = int(time.time() * 1000)
    few = [_row(now_ms - i) for i in range(10)]
    many = [_row(now_ms - i, f"t{i % 7}") for i in range(FOLD_MAX_ROWS)]

    async def body(b: Backend) -> list[int]:
        await b.insert_batches([{"tool_execution": few}])
        # A few rows: not folded early (looked at over five of the loop's check periods).
        few_folded = []
        for _ in range(5):
            await asyncio.sleep(0.1)
            few_folded.append(await rolled_calls(b))

        async def all_folded() -> bool:
            return await rolled_calls(b) == len(few) + len(many)

        await b.insert_batches([{"tool_execution": many}])
        await _until(all_folded, timeout_s=20)
        return few_folded

    assert with_backend(postgres_url, body, rollup_fold_interval_s=60) == [0] * 5


def test_the_writers_connection_is_replaced_after_the_server_drops_it(postgres_url: str) -> None:
    """The writer holds one connection across commits: when the server ends it, the next
    commit either sees it closed and takes another, or fails as a ``StorageError`` (a 503 for
    the client, which retries: never another error) and the one after takes another; two
    commits at once both go through (the second on a pooled connection)."""
    from metrics_service.errors import StorageError

    now_ms = int(time.time() * 1000)

    async def body(b: Backend) -> dict[str, Any]:
        seen: dict[str, Any] = {
            "first": await b.insert_batches([{"tool_execution": [_row(now_ms)]}])
        }
        killer = await asyncpg.connect(postgres_url)
        try:
            seen["ended"] = await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await killer.close()
        try:
            await b.insert_batches([{"tool_execution": [_row(now_ms + 1)]}])
            seen["after the drop"] = "stored"
        except StorageError:
            seen["after the drop"] = "refused"
        seen["next"] = await b.insert_batches([{"tool_execution": [_row(now_ms + 2)]}])
        seen["at once"] = await asyncio.gather(
            *(b.insert_batches([{"tool_execution": [_row(now_ms + 3 + i)]}]) for i in range(2))
        )
        seen["rows"] = (await b.execute("SELECT count(*) FROM tool_metrics"))[0][0]
        return seen

    seen = with_backend(postgres_url, body)
    assert seen["first"] == 1 and seen["ended"] >= 1
    assert seen["next"] == 1 and seen["at once"] == [1, 1]
    assert seen["rows"] == (5 if seen["after the drop"] == "stored" else 4)
