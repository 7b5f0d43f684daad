"""Admin endpoints the MCP Gateway Registry's metrics-service has and this service had not, with
its response shapes (docs/migrating.md): the retention preview, table statistics and file sizes.

The numbers come from the storage backend (``StorageBackend.retention_preview``, ``table_stats``,
``database_size``). The routes are added to the admin router of ``api`` (imported by ``app``).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import Response

from metrics_service.api import Admin, admin, json_response, refuse_unknown_query, state
from metrics_service.api import tables_named as _tables_named


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
    body = await app.storage.retention_preview(app.settings.retention_days, tables, now)
    return json_response(body)


@admin.get("/database/stats")
async def database_stats(request: Request, _: Admin) -> Response:
    """Per table: rows, oldest and newest event, retention policy."""
    app = state(request)
    refuse_unknown_query(request, ())
    body = await app.storage.table_stats(
        app.settings.retention_days, app.settings.rollup_retention_days
    )
    return json_response(body)


@admin.get("/database/size")
async def database_size_route(request: Request, _: Admin) -> Response:
    """Bytes of the database, WAL and shared-memory files; pages used and free."""
    app = state(request)
    refuse_unknown_query(request, ())
    body = await app.storage.database_size()
    return json_response(body)
