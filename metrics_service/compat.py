"""Admin endpoints the MCP Gateway Registry's metrics-service has and this service had not, with
its response shapes (docs/migrating.md): the retention preview, table statistics and file sizes.

Table names in SQL come from the fixed ``storage.TABLES`` and ``rollups.TABLES`` lists, never from
input. The routes are added to the admin router of ``api`` (imported by ``app``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import Response

from metrics_service import storage
from metrics_service.api import Admin, admin, json_response, refuse_unknown_query, state
from metrics_service.api import tables_named as _tables_named
from metrics_service.storage import rollups


def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def retention_preview(
    conn: sqlite3.Connection, default_days: int, tables: list[str] | None, now_s: float
) -> dict[str, dict[str, Any]]:
    """Per table with an enabled policy: what a cleanup would delete now."""
    out: dict[str, dict[str, Any]] = {}
    for policy in storage.retention_policies(conn, default_days):
        if not policy.enabled or (tables is not None and policy.table not in tables):
            continue
        table = policy.table
        cutoff = storage.cutoff_ms(policy.retention_days, now_s)
        expired, oldest, newest = conn.execute(
            f"SELECT count(*), min(ts), max(ts) FROM {table} WHERE ts < ?", (cutoff,)
        ).fetchone()
        total = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        out[table] = {
            "retention_days": policy.retention_days,
            "records_to_delete": expired,
            "total_records": total,
            "oldest_record_to_delete": _iso_ms(oldest),
            "newest_record_to_delete": _iso_ms(newest),
            "cutoff_date": _iso_ms(cutoff),
            "percentage_to_delete": round(100.0 * expired / total, 2) if total else 0,
        }
    return out


def table_stats(
    conn: sqlite3.Connection, default_days: int, rollup_days: int
) -> dict[str, dict[str, Any]]:
    """Rows, oldest and newest event per raw table and rollup table, and the policy of each."""
    policies = {p.table: p for p in storage.retention_policies(conn, default_days)}
    out: dict[str, dict[str, Any]] = {}
    for table in storage.TABLES:
        count, oldest, newest = conn.execute(
            f"SELECT count(*), min(ts), max(ts) FROM {table}"
        ).fetchone()
        policy = policies.get(table)
        out[table] = {
            "record_count": count,
            "oldest_record": _iso_ms(oldest),
            "newest_record": _iso_ms(newest),
            "has_retention_policy": policy is not None,
            "retention_days": policy.retention_days if policy else None,
            "policy_active": policy.enabled if policy else None,
        }
    for table in rollups.TABLES:
        count, oldest, newest = conn.execute(
            f"SELECT count(*), min(bucket), max(bucket) FROM {table}"
        ).fetchone()
        out[table] = {
            "record_count": count,
            "oldest_record": _iso_ms(oldest),
            "newest_record": _iso_ms(newest),
            "has_retention_policy": True,
            "retention_days": rollup_days,
            "policy_active": True,
        }
    return out


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def database_size(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """The database file, its WAL and shared-memory file, and SQLite's page accounting."""
    main, wal, shm = _size(path), _size(Path(f"{path}-wal")), _size(Path(f"{path}-shm"))
    total = main + wal + shm
    page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
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


@admin.get("/retention/preview")
async def preview(
    request: Request,
    _: Admin,
    table_name: Annotated[
        str | None, Query(description="Only this table (metrics: every raw table).")
    ] = None,
) -> Response:
    """What ``POST /admin/retention/cleanup?dry_run=false`` would delete now, per table."""
    app = state(request)
    refuse_unknown_query(request, ("table_name",))
    tables = _tables_named(table_name) if table_name is not None else None
    now = time.time()
    body = await app.reader.run(
        lambda c: retention_preview(c, app.settings.retention_days, tables, now)
    )
    return json_response(body)


@admin.get("/database/stats")
async def database_stats(request: Request, _: Admin) -> Response:
    """Per table: rows, oldest and newest event, retention policy."""
    app = state(request)
    refuse_unknown_query(request, ())
    body = await app.reader.run(
        lambda c: table_stats(c, app.settings.retention_days, app.settings.rollup_retention_days)
    )
    return json_response(body)


@admin.get("/database/size")
async def database_size_route(request: Request, _: Admin) -> Response:
    """Bytes of the database, WAL and shared-memory files; pages used and free."""
    app = state(request)
    refuse_unknown_query(request, ())
    path = app.settings.db_path
    body = await app.reader.run(lambda c: database_size(c, path))
    return json_response(body)
