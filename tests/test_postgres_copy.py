"""A SQLite history copied into PostgreSQL answers every analytics query the same, keeps its
keys (revoked ones revoked) and idempotency keys, and a second copy into the same database is
refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from metrics_service import Settings, storage
from metrics_service.errors import StorageError
from metrics_service.idempotency import Claim
from metrics_service.storage.postgres import Backend
from metrics_service.storage.postgres.copy import copy_from_sqlite
from metrics_service.storage.sqlite import database as sqlite_db
from metrics_service.storage.sqlite import keys as sqlite_keys
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from tests._analytics_seed import seed_rows
from tests.test_postgres_backend import _norm, _queries


def test_copy_from_sqlite_keeps_every_answer_key_and_policy(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    now_ms = int(now * 1000)
    conn, _ = storage.open_database(settings.db_path)
    half = len(parts) // 2
    for part in parts[:half]:
        storage.insert_rows(conn, [part])
    # The rest as the service's writer commits them: not folded into the rollups yet (as in a
    # file whose service was killed before its fold).
    deferred = sqlite_db.Deferred(max_age_s=3600)
    for part in parts[half:-1]:
        storage.insert_rows(conn, [part], (), deferred)
    claim = Claim("svc", "key-1", "fp", 200, b'{"ok":1}', 3600)
    storage.insert_rows(conn, parts[-1:], [claim], deferred)
    sqlite_keys.insert_key(
        conn,
        service="svc",
        role="ingest",
        key_hash="b" * 64,
        key_prefix="bbb",
        rate_limit_per_min=5,
        source="cli",
        aliases=("svc-x",),
    )
    revoked = sqlite_keys.insert_key(
        conn,
        service="svc",
        role="ingest",
        key_hash="c" * 64,
        key_prefix="ccc",
        rate_limit_per_min=None,
        source="cli",
    )
    sqlite_keys.revoke_key(conn, revoked.id)
    sqlite_db.set_retention_policy(conn, "tool_metrics", 45, None)
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in storage.TABLES}
    unfolded = {
        t: conn.execute(f"SELECT count(*) FROM {t} WHERE id > ?", (m,)).fetchone()[0]
        for t, m in sqlite_rollups.marks(conn).items()
    }
    expected = [_norm(sqlite_rollups.aggregate(conn, q)[1]) for q in _queries(now_ms)]
    keys = sqlite_keys.list_keys(conn)
    conn.close()

    async def body() -> tuple[dict[str, int], list[Any], list[Any], Any, list[Any], int]:
        backend = Backend(None, postgres_url)
        await backend.open()
        try:
            copied = await copy_from_sqlite(settings.db_path, backend)

            async def view(reader: Any) -> list[Any]:
                return [_norm((await reader.aggregate(q))[1]) for q in _queries(now_ms)]

            answers = await backend.analytics(view)
            pg_keys = await backend.list_keys()
            replay = await backend.idempotency_lookup("svc", "key-1", 3600)
            policies = await backend.retention_policies(90)
            # New rows continue the ids after the copied ones.
            await backend.insert_batches([parts[0]])
            ids = await backend.execute("SELECT count(DISTINCT id), count(*) FROM tool_metrics")
            with pytest.raises(StorageError, match="already holds"):
                await copy_from_sqlite(settings.db_path, backend)
            return copied, answers, pg_keys, replay, policies, ids[0][0] - ids[0][1]
        finally:
            await backend.close()

    copied, answers, pg_keys, replay, policies, duplicate_ids = asyncio.run(body())
    assert {t: copied[t] for t in storage.TABLES} == counts
    assert sum(counts.values()) > 500
    assert sum(unfolded.values()) > 100
    assert answers == expected
    assert pg_keys == keys
    assert [k.revoked_at is not None for k in pg_keys] == [False, True]
    assert replay is not None and replay.response == b'{"ok":1}'
    assert {p.table: p.retention_days for p in policies}["tool_metrics"] == 45
    assert duplicate_ids == 0
