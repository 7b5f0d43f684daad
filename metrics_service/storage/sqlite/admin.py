"""The SQLite backend's reads for the admin API and the CLI, through ``aiosqlite``: retention
policies and preview, table statistics, file sizes, ``db stats``, keys and idempotency lookups.

Table names come from the fixed ``TABLES`` and ``rollups.TABLES`` lists, never from input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from metrics_service.idempotency import Stored
from metrics_service.storage import rollups
from metrics_service.storage.backend import KeyRecord, Policy, iso_ms, retention_preview_entry
from metrics_service.storage.schema import TABLES
from metrics_service.storage.sqlite import idempotency, keys
from metrics_service.storage.sqlite.database import POLICIES_SQL, cutoff_ms, policies_of


async def one(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> Any:
    """The first row of ``sql`` (None if there is none)."""
    rows = list(await conn.execute_fetchall(sql, tuple(params)))
    return rows[0] if rows else None


async def retention_policies(conn: aiosqlite.Connection, default_days: int) -> list[Policy]:
    return policies_of(await conn.execute_fetchall(POLICIES_SQL), default_days)


async def list_keys(conn: aiosqlite.Connection, *, active_only: bool = False) -> list[KeyRecord]:
    return [keys.record(row) for row in await conn.execute_fetchall(keys.list_sql(active_only))]


async def idempotency_lookup(
    conn: aiosqlite.Connection, service: str, key: str, window_s: float
) -> Stored | None:
    row = await one(conn, idempotency.LOOKUP_SQL, (service, key, idempotency.cutoff_of(window_s)))
    return idempotency.stored(row)


async def retention_preview(
    conn: aiosqlite.Connection, default_days: int, tables: Sequence[str] | None, now_s: float
) -> dict[str, dict[str, Any]]:
    """Per table with an enabled policy: what a cleanup would delete now."""
    out: dict[str, dict[str, Any]] = {}
    for policy in await retention_policies(conn, default_days):
        if not policy.enabled or (tables is not None and policy.table not in tables):
            continue
        table = policy.table
        cutoff = cutoff_ms(policy.retention_days, now_s)
        expired, oldest, newest = await one(
            conn, f"SELECT count(*), min(ts), max(ts) FROM {table} WHERE ts < ?", (cutoff,)
        )
        (total,) = await one(conn, f"SELECT count(*) FROM {table}")
        out[table] = retention_preview_entry(
            policy.retention_days, cutoff, expired, total, oldest, newest
        )
    return out


async def table_stats(
    conn: aiosqlite.Connection, default_days: int, rollup_days: int
) -> dict[str, dict[str, Any]]:
    """Rows, oldest and newest event per raw table and rollup table, and the policy of each."""
    policies = {p.table: p for p in await retention_policies(conn, default_days)}
    out: dict[str, dict[str, Any]] = {}
    for table in TABLES:
        count, oldest, newest = await one(conn, f"SELECT count(*), min(ts), max(ts) FROM {table}")
        policy = policies.get(table)
        out[table] = {
            "record_count": count,
            "oldest_record": iso_ms(oldest),
            "newest_record": iso_ms(newest),
            "has_retention_policy": policy is not None,
            "retention_days": policy.retention_days if policy else None,
            "policy_active": policy.enabled if policy else None,
        }
    for table in rollups.TABLES:
        count, oldest, newest = await one(
            conn, f"SELECT count(*), min(bucket), max(bucket) FROM {table}"
        )
        out[table] = {
            "record_count": count,
            "oldest_record": iso_ms(oldest),
            "newest_record": iso_ms(newest),
            "has_retention_policy": True,
            "retention_days": rollup_days,
            "policy_active": True,
        }
    return out


def size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def _pragma(conn: aiosqlite.Connection, name: str) -> int:
    # ``name`` is one of the fixed names below.
    return int((await one(conn, f"PRAGMA {name}"))[0])


async def database_size(conn: aiosqlite.Connection, path: Path) -> dict[str, Any]:
    """The database file, its WAL and shared-memory file, and SQLite's page accounting."""
    main, wal, shm = size(path), size(Path(f"{path}-wal")), size(Path(f"{path}-shm"))
    total = main + wal + shm
    page_count = await _pragma(conn, "page_count")
    page_size = await _pragma(conn, "page_size")
    free = await _pragma(conn, "freelist_count")
    mib = 1024 * 1024
    return {
        "main_db_bytes": main,
        "main_db_mb": round(main / mib, 2),
        "wal_bytes": wal,
        "wal_mb": round(wal / mib, 2),
        "shm_bytes": shm,
        "shm_mb": round(shm / mib, 2),
        "total_bytes": total,
        "total_mb": round(total / mib, 2),
        "total_gb": round(total / mib / 1024, 3),
        "page_count": page_count,
        "page_size": page_size,
        "free_pages": free,
        "used_pages": page_count - free,
        "database_efficiency": round(100.0 * (page_count - free) / page_count, 2)
        if page_count
        else 0,
    }


async def stats(conn: aiosqlite.Connection, path: Path) -> dict[str, Any]:
    """Rows per table and the size of the database and its WAL, in bytes."""
    rows = {}
    for table in TABLES:
        (rows[table],) = await one(conn, f"SELECT count(*) FROM {table}")
    return {
        "path": str(path),
        "rows": rows,
        "total_rows": sum(rows.values()),
        "file_bytes": size(path),
        "wal_bytes": size(Path(f"{path}-wal")),
        "page_size": await _pragma(conn, "page_size"),
        "page_count": await _pragma(conn, "page_count"),
        "free_pages": await _pragma(conn, "freelist_count"),
        "schema_version": await _pragma(conn, "user_version"),
    }
