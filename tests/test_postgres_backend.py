"""The PostgreSQL backend against a real PostgreSQL 15: migrations applied exactly once by
replicas starting together, rollups equal to the raw rows (and to SQLite's answers), daily
partitions dropped by retention while ingest goes on, idempotency claims and keys shared
through the database, start-up errors that name the variable and hide the password."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from metrics_service import Settings, storage
from metrics_service.errors import StorageError
from metrics_service.idempotency import Claim
from metrics_service.storage import rollups
from metrics_service.storage.postgres import LATEST_VERSION, Backend
from metrics_service.storage.postgres import partitions as pg_partitions
from metrics_service.storage.postgres.backend import RETENTION_LOCK
from metrics_service.storage.rollups import DAY_MS, HOUR_MS, Query
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from tests._analytics_seed import seed_rows
from tests._servers import PG_PASSWORD, PostgresServer

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def opened(url: str) -> Backend:
    backend = Backend(None, url)
    await backend.open()
    return backend


def with_backend(url: str, body: Callable[[Backend], Awaitable[T]]) -> T:
    async def go() -> T:
        backend = await opened(url)
        try:
            return await body(backend)
        finally:
            await backend.close()

    return asyncio.run(go())


_MIGRATE = """
import asyncio, json, sys
from metrics_service.storage.postgres import Backend
async def main():
    b = Backend(None, sys.argv[1])
    await b.open()
    print(json.dumps(b.applied_migrations))
    await b.close()
asyncio.run(main())
"""


def test_two_replicas_starting_at_once_apply_each_migration_exactly_once(
    postgres_url: str,
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, postgres_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    applied = sorted(v for out in outs for v in json.loads(out))
    assert applied == list(range(1, LATEST_VERSION + 1))

    async def check(b: Backend) -> tuple[list[tuple[Any, ...]], list[int]]:
        again = Backend(None, postgres_url)
        await again.open()
        await again.close()
        return await b.execute("SELECT version FROM schema_migrations"), again.applied_migrations

    rows, third = with_backend(postgres_url, check)
    assert sorted(r[0] for r in rows) == list(range(1, LATEST_VERSION + 1))
    assert third == []


def _queries(now_ms: int) -> list[Query]:
    """Every cube grouped by all its dimensions, over ranges with ragged ends, and a series."""
    ranges = [
        (now_ms - 4 * DAY_MS, now_ms),
        (now_ms - 2 * DAY_MS + 17 * 60_000, now_ms - 5 * HOUR_MS - 3 * 60_000),
    ]
    out = []
    for cube in rollups.CUBES:
        for lo, hi in ranges:
            out.append(Query(cube.kind, lo, hi, group=cube.dims))
        out.append(Query(cube.kind, ranges[0][0], ranges[0][1], series_ms=HOUR_MS))
    # No cube holds a tool by agent: read from the raw rows.
    out.append(Query("tool_execution", ranges[0][0], ranges[0][1], group=("tool_name", "agent_id")))
    return out


def _norm(states: dict[tuple[Any, ...], list[Any]]) -> dict[tuple[Any, ...], list[Any]]:
    return {k: [round(v, 6) if isinstance(v, float) else v for v in st] for k, st in states.items()}


def test_rollups_and_raw_rows_give_the_answers_sqlite_gives(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    now_ms = int(now * 1000)
    conn, _ = storage.open_database(settings.db_path)
    for i in range(0, len(parts), 2):
        storage.insert_rows(conn, parts[i : i + 2])

    def sqlite_answers() -> list[Any]:
        return [_norm(sqlite_rollups.aggregate(conn, q)[1]) for q in _queries(now_ms)]

    async def body(b: Backend) -> tuple[list[Any], list[Any], list[str], int]:
        for i in range(0, len(parts), 2):
            await b.insert_batches(parts[i : i + 2])
        before = await b.analytics(_all)
        compacted = await b.compact_rollups(now_ms)
        after = await b.analytics(_all)
        sources = await b.analytics(_sources)
        return before, after, sources, compacted

    async def _all(reader: Any) -> list[Any]:
        return [_norm((await reader.aggregate(q))[1]) for q in _queries(now_ms)]

    async def _sources(reader: Any) -> list[str]:
        return [(await reader.aggregate(q))[2] for q in _queries(now_ms)]

    expected = sqlite_answers()
    before, after, sources, compacted = with_backend(postgres_url, body)
    assert compacted == 0  # migration 1 starts the watermark at today: nothing older to compact
    assert before == expected
    assert after == expected
    assert "rollup" in sources and "raw" in sources
    assert all(answer for answer in expected[:-1:3])  # the seed fills every cube


def test_compaction_moves_days_into_day_rollups_without_changing_an_answer(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    now_ms = int(now * 1000)
    today = now_ms // DAY_MS * DAY_MS

    async def answers(b: Backend) -> list[Any]:
        async def view(reader: Any) -> list[Any]:
            return [_norm((await reader.aggregate(q))[1]) for q in _queries(now_ms)]

        return await b.analytics(view)

    async def body(b: Backend) -> tuple[list[Any], list[Any], int, int]:
        # As if the service had first started four days ago.
        await b.execute("UPDATE rollup_watermark SET until_ms = $1", today - 4 * DAY_MS)
        for part in parts:
            await b.insert_batches([part])
        before = await answers(b)
        days = await b.compact_rollups(now_ms)
        day_rows = await b.execute("SELECT count(*) FROM rollup_tools_day")
        after = await answers(b)
        return before, after, days, day_rows[0][0]

    before, after, days, day_rows = with_backend(postgres_url, body)
    assert days == 4
    assert day_rows > 0
    assert after == before


def test_a_replica_that_missed_a_compaction_still_writes_exact_rollups(
    postgres_url: str, tmp_path: Path
) -> None:
    """Replica A inserted rows; replica B then compacted four days (folding A's rows first).
    A's next inserts, for those days too, are folded with the new watermark, into the day
    tables: every answer stays SQLite's for the same rows."""
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    now_ms = int(now * 1000)
    today = now_ms // DAY_MS * DAY_MS
    conn, _ = storage.open_database(settings.db_path)
    storage.insert_rows(conn, parts)
    expected = [_norm(sqlite_rollups.aggregate(conn, q)[1]) for q in _queries(now_ms)]
    half = len(parts) // 2

    async def view(reader: Any) -> list[Any]:
        return [_norm((await reader.aggregate(q))[1]) for q in _queries(now_ms)]

    async def body(a: Backend) -> tuple[int, list[Any]]:
        await a.execute("UPDATE rollup_watermark SET until_ms = $1", today - 4 * DAY_MS)
        for part in parts[:half]:
            await a.insert_batches([part])
        b = await opened(postgres_url)
        try:
            days = await b.compact_rollups(now_ms)
        finally:
            await b.close()
        for i in range(half, len(parts), 3):
            await a.insert_batches(parts[i : i + 3])
        return days, await a.analytics(view)

    days, answers = with_backend(postgres_url, body)
    assert days == 4
    assert answers == expected


def test_raw_tables_are_partitioned_by_day_ahead_of_time(postgres_url: str) -> None:
    async def body(b: Backend) -> list[tuple[Any, ...]]:
        return await b.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'tool_metrics'"
            " ORDER BY 1"
        )

    names = [r[0] for r in with_backend(postgres_url, body)]
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    want = [pg_partitions.name("tool_metrics", today + i * DAY_MS) for i in range(-1, 3)]
    assert names == want


def _custom_rows(ts_ms: list[int], tag: str) -> dict[str, list[tuple[Any, ...]]]:
    now = int(time.time() * 1000)
    meta = [json.dumps({"tag": tag, "n": i}) for i in range(len(ts_ms))]
    return {
        "custom": [
            (t, now, "svc", "1", None, 1.0, None, None, m) for t, m in zip(ts_ms, meta, strict=True)
        ]
    }


def test_retention_drops_whole_partitions_while_ingest_goes_on(postgres_url: str) -> None:
    """Ten days of backlog, one row an hour; retention at 3 days: the seven days wholly older
    go as partitions, the boundary day loses only its older rows, and batches inserted all the
    while (into today) are all there."""
    now_ms = int(time.time() * 1000)
    cutoff = now_ms - 3 * DAY_MS
    backlog = [now_ms - h * HOUR_MS for h in range(1, 10 * 24)]

    async def body(b: Backend) -> tuple[int, int, int, int, int, int]:
        for i in range(0, len(backlog), 50):
            await b.insert_batches([_custom_rows(backlog[i : i + 50], "old")])
        stop = asyncio.Event()
        inserted = 0

        async def ingest() -> None:
            nonlocal inserted
            while not stop.is_set():
                await b.insert_batches([_custom_rows([int(time.time() * 1000)] * 20, "live")])
                inserted += 20
                await asyncio.sleep(0)

        task = asyncio.create_task(ingest())
        deleted = 0
        rounds = 0
        while True:
            n = await b.delete_expired("custom_metrics", cutoff, 1000)
            rounds += 1
            deleted += n
            if n == 0:
                break
        # Ingest goes on after the last partition is gone: a few more inserts land first.
        after = inserted
        while inserted < after + 100 and not task.done():
            await asyncio.sleep(0)
        stop.set()
        await task
        kept_old = (
            await b.execute(
                "SELECT count(*) FROM custom_metrics WHERE metadata::jsonb->>'tag' = 'old'"
            )
        )[0][0]
        live = (
            await b.execute(
                "SELECT count(*) FROM custom_metrics WHERE metadata::jsonb->>'tag' = 'live'"
            )
        )[0][0]
        dropped_parts = sum(
            1 for t, day in b.partitions.known if t == "custom_metrics" and day + DAY_MS <= cutoff
        )
        # The pool's connections go back without asyncpg's reset query: none may still hold
        # the retention run's session lock.
        locks = (
            await b.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND objid = $1::bigint % 4294967296",
                RETENTION_LOCK,
            )
        )[0][0]
        return deleted, kept_old, live, inserted, dropped_parts, locks

    deleted, kept_old, live, inserted, left_parts, locks = with_backend(postgres_url, body)
    assert locks == 0
    expected_kept = sum(1 for t in backlog if t >= cutoff)
    assert deleted == len(backlog) - expected_kept
    assert kept_old == expected_kept
    assert inserted > 0 and live == inserted
    assert left_parts == 0


def test_an_idempotency_key_claimed_by_one_replica_stores_nothing_on_another(
    postgres_url: str,
) -> None:
    async def body(b: Backend) -> tuple[int, int, bool, int]:
        other = await opened(postgres_url)
        try:
            part = _custom_rows([int(time.time() * 1000)] * 3, "idem")
            first = Claim("svc", "k-1", "fp", 200, b'{"accepted":3}', 3600)
            n1 = await b.insert_batches([part], [first])
            again = Claim("svc", "k-1", "fp", 200, b"{}", 3600)
            n2 = await other.insert_batches([part], [again])
            rows = (await other.execute("SELECT count(*) FROM custom_metrics"))[0][0]
            replayed = again.existing is not None and again.existing.response == b'{"accepted":3}'
            return n1, n2, replayed, rows
        finally:
            await other.close()

    assert with_backend(postgres_url, body) == (3, 0, True, 3)


def test_a_group_with_a_key_committed_or_repeated_stores_each_batch_at_most_once(
    postgres_url: str,
) -> None:
    """A group whose claims cannot all win in the one-call path (a key committed earlier, a key
    twice in the group) is claimed one key at a time: the new batches are stored, the others
    replay the first answer, nothing is stored twice."""

    async def body(b: Backend) -> tuple[int, list[bytes | None], int]:
        now = int(time.time() * 1000)
        first = Claim("svc", "k-old", "fp", 200, b"old", 3600)
        await b.insert_batches([_custom_rows([now], "a")], [first])
        claims = [
            Claim("svc", "k-new", "fp", 200, b"new", 3600),
            Claim("svc", "k-old", "fp", 200, b"retry", 3600),
            Claim("svc", "k-twice", "fp", 200, b"twice-1", 3600),
            Claim("svc", "k-twice", "fp", 200, b"twice-2", 3600),
        ]
        parts = [_custom_rows([now] * 2, tag) for tag in ("b", "c", "d", "e")]
        n = await b.insert_batches(parts, claims)
        replays = [c.existing.response if c.existing else None for c in claims]
        rows = (await b.execute("SELECT count(*) FROM custom_metrics"))[0][0]
        return n, replays, rows

    n, replays, rows = with_backend(postgres_url, body)
    assert n == 4  # k-new and the first k-twice
    assert replays == [None, b"old", None, b"twice-1"]
    assert rows == 5


def test_a_key_revoked_through_one_backend_is_gone_for_another(postgres_url: str) -> None:
    async def body(b: Backend) -> tuple[list[int], list[int], Any]:
        other = await opened(postgres_url)
        try:
            key = await b.create_key(
                service="svc",
                role="ingest",
                key_hash="a" * 64,
                key_prefix="abc",
                rate_limit_per_min=None,
                source="cli",
                aliases=("svc-2",),
            )
            seen = [k.id for k in await other.list_keys(active_only=True)]
            await other.revoke_key(key.id)
            after = [k.id for k in await b.list_keys(active_only=True)]
            return seen, after, (await b.list_keys())[0]
        finally:
            await other.close()

    seen, after, record = with_backend(postgres_url, body)
    assert len(seen) == 1 and after == []
    assert record.aliases == ("svc-2",) and record.revoked_at is not None


def test_unreachable_server_fails_naming_the_variable_without_the_password(
    postgres_cluster: PostgresServer,
) -> None:
    from tests._ports import free_port

    url = f"postgresql://metrics:{PG_PASSWORD}@127.0.0.1:{free_port()}/metrics"
    with pytest.raises(StorageError) as caught:
        run(Backend(None, url, connect_timeout_s=2).open())
    assert "METRICS_DATABASE_URL" in str(caught.value)
    assert PG_PASSWORD not in str(caught.value)
    wrong = postgres_cluster.url().replace(PG_PASSWORD, "wrong-password-123")
    with pytest.raises(StorageError) as caught:
        run(Backend(None, wrong, connect_timeout_s=5).open())
    assert "METRICS_DATABASE_URL" in str(caught.value)
    assert "wrong-password-123" not in str(caught.value)


def test_migration_4_widens_the_counts_of_a_database_holding_rows(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at version 3 with rows in it: migration 4 turns the typed integer columns to
    bigint, keeps every row as it was, and the metrics view reads them afterwards."""
    import asyncpg

    from metrics_service.storage.postgres import migrations

    latest = migrations.MIGRATIONS

    async def main() -> tuple[list[int], list[str], list[tuple[Any, ...]], int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            monkeypatch.setattr(migrations, "MIGRATIONS", latest[:3])
            assert await migrations.apply(conn) == [1, 2, 3]
            await conn.execute(
                "CREATE TABLE tool_metrics_all PARTITION OF tool_metrics"
                " FOR VALUES FROM (0) TO (4000000000000)"
            )
            await conn.execute(
                "INSERT INTO tool_metrics (ts, received_at, service, service_version, value,"
                " method, tool_name, success, input_size_bytes)"
                " VALUES (1800000000000, 1800000000000, 'svc', '', 1, 'tools/call', 't', 1, $1)",
                2**31 - 1,
            )
            monkeypatch.setattr(migrations, "MIGRATIONS", latest[:4])
            applied = await migrations.apply(conn)
            types = await conn.fetch(
                "SELECT data_type FROM information_schema.columns WHERE table_name ="
                " 'tool_metrics' AND column_name IN ('input_size_bytes', 'output_tokens',"
                " 'success') ORDER BY column_name"
            )
            await conn.execute(
                "INSERT INTO tool_metrics (ts, received_at, service, service_version, value,"
                " method, tool_name, success, input_size_bytes)"
                " VALUES (1800000000001, 1800000000001, 'svc', '', 1, 'tools/call', 't', 0, $1)",
                2**40,
            )
            rows = await conn.fetch("SELECT input_size_bytes FROM tool_metrics ORDER BY ts")
            in_view = await conn.fetchval(
                "SELECT count(*) FROM metrics WHERE type = 'tool_execution'"
            )
        finally:
            await conn.close()
        return applied, [r[0] for r in types], [tuple(r) for r in rows], int(in_view)

    applied, types, rows, in_view = asyncio.run(main())
    assert applied == [4]
    assert types == ["bigint", "bigint", "bigint"]
    assert rows == [(2**31 - 1,), (2**40,)]
    assert in_view == 2
