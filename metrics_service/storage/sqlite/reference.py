"""A database file written by the MCP Gateway Registry's metrics-service, adopted in place.

That service creates ``metrics``, ``auth_metrics``, ``tool_metrics``, ``discovery_metrics``,
``api_keys`` (and, if its migrations ran, more) without ``PRAGMA user_version``. Opening such a
file here would fail on "table auth_metrics already exists". Instead:

1. ``adopt_schema`` (before the migrations, one transaction): every table of a version-0 file
   that has the reference's shape is renamed ``reference_<name>`` and its indexes are dropped
   (their names would collide with ours). No row is touched.
2. The migrations create this service's schema beside them.
3. ``import_rows`` (on every open for writing, until done): the reference's keys become ingest
   keys with the same secrets (both services store SHA-256 hex of the key), and every row of its
   ``metrics`` table (it holds every event of every type, with all dimensions and metadata) is
   validated as an ingest item and stored, in chunks, each chunk one transaction with its
   progress mark, so an interrupted import resumes where it stopped. Rows older than the
   retention period are not imported (retention would delete them); rows that fail validation
   stay only in ``reference_metrics``, counted and logged.
4. ``metrics-service db drop-reference`` drops the ``reference_*`` tables once imported.

The reference's documented SQL reads a text ``timestamp`` column. ``enable_sql_columns`` adds it
to ``auth_metrics``, ``tool_metrics`` and ``discovery_metrics`` as a virtual generated column;
SQLite evaluates generated columns on every insert, so it costs about 0.8 us per stored metric
(``bench/stages.py``: insert 5.7 -> 6.5 us): added when a reference file is adopted, else on
request (``metrics-service db reference-sql on``), and removable (``off``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from metrics_service.storage.sqlite import rollups
from metrics_service.storage.sqlite.keys import insert_key

log = logging.getLogger(__name__)

PREFIX = "reference_"
#: Tables whose presence (with these columns) at version 0 marks the reference's schema.
_SIGNATURE = {
    "metrics": {"request_id", "metric_type", "timestamp"},
    "auth_metrics": {"request_id", "timestamp"},
    "tool_metrics": {"request_id", "timestamp"},
    "discovery_metrics": {"request_id", "timestamp"},
    "api_keys": {"service_name", "key_hash"},
}
CHUNK_ROWS = 5000


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}


def _user_tables(conn: sqlite3.Connection) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]


def is_reference_schema(conn: sqlite3.Connection) -> bool:
    """A version-0 file holding at least one table of the reference's shape."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) != 0:
        return False
    tables = set(_user_tables(conn))
    return any(t in tables and cols <= _columns(conn, t) for t, cols in _SIGNATURE.items())


def adopt_schema(conn: sqlite3.Connection) -> list[str]:
    """Rename the reference's tables to ``reference_*``; return the new names (none: not a
    reference file). ``conn`` is in autocommit."""
    if not is_reference_schema(conn):
        return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not is_reference_schema(conn):  # another process adopted it meanwhile
            conn.execute("ROLLBACK")
            return []
        renamed = []
        indexes = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
        for (index,) in indexes:
            conn.execute(f'DROP INDEX "{index}"')
        for table in _user_tables(conn):
            if table.startswith(PREFIX):
                continue
            conn.execute(f'ALTER TABLE "{table}" RENAME TO "{PREFIX}{table}"')
            renamed.append(PREFIX + table)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.warning(
        "this database was written by the MCP Gateway Registry's metrics-service: its tables "
        "were renamed %s; their rows are imported next (docs/migrating.md)",
        ", ".join(renamed),
    )
    return renamed


SQL_COLUMN_TABLES = ("auth_metrics", "tool_metrics", "discovery_metrics")


def sql_columns_enabled(conn: sqlite3.Connection) -> bool:
    return all(
        "timestamp" in {r[1] for r in conn.execute(f"PRAGMA table_xinfo({t})")}
        for t in SQL_COLUMN_TABLES
    )


def set_sql_columns(conn: sqlite3.Connection, enabled: bool) -> bool:
    """Add (or drop) the reference's ``timestamp`` column on the raw tables its SQL reads;
    return whether anything changed. ``conn`` is in autocommit."""
    from metrics_service.storage.sqlite.migrations import TEXT_TIME, compat_column

    conn.execute("BEGIN IMMEDIATE")
    changed = False
    try:
        for table in SQL_COLUMN_TABLES:
            have = "timestamp" in {r[1] for r in conn.execute(f"PRAGMA table_xinfo({table})")}
            if enabled and not have:
                conn.execute(compat_column(table, "timestamp", "TEXT", TEXT_TIME))
                changed = True
            elif not enabled and have:
                conn.execute(f"ALTER TABLE {table} DROP COLUMN timestamp")
                changed = True
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return changed


def _has(conn: sqlite3.Connection, table: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        is not None
    )


def _progress(conn: sqlite3.Connection, name: str) -> tuple[int, bool]:
    row = conn.execute(
        "SELECT last_id, done FROM reference_import WHERE name = ?", (name,)
    ).fetchone()
    return (int(row[0]), bool(row[1])) if row else (0, False)


def _mark(
    conn: sqlite3.Connection, name: str, last_id: int, done: bool, counts: dict[str, int]
) -> None:
    conn.execute(
        "INSERT INTO reference_import (name, last_id, done, imported, expired, rejected,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
        " last_id = excluded.last_id, done = excluded.done,"
        " imported = imported + excluded.imported, expired = expired + excluded.expired,"
        " rejected = rejected + excluded.rejected, updated_at = excluded.updated_at",
        (
            name,
            last_id,
            int(done),
            counts.get("imported", 0),
            counts.get("expired", 0),
            counts.get("rejected", 0),
            int(time.time() * 1000),
        ),
    )


def _ms(text: Any) -> int | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _import_keys(conn: sqlite3.Connection) -> dict[str, int]:
    from metrics_service.settings import valid_service_name

    counts = {"imported": 0, "rejected": 0}
    columns = _columns(conn, PREFIX + "api_keys")
    description = "description" if "description" in columns else "NULL"
    rows = conn.execute(
        f"SELECT key_hash, service_name, created_at, is_active, rate_limit, {description}"
        " FROM reference_api_keys ORDER BY id"
    ).fetchall()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for key_hash, service_name, created_at, is_active, rate_limit, text in rows:
            service = str(service_name or "").lower()
            known = conn.execute(
                "SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            if known or not valid_service_name(service) or not isinstance(key_hash, str):
                counts["rejected"] += 0 if known else 1
                continue
            now = int(time.time() * 1000)
            insert_key(
                conn,
                service=service,
                role="ingest",
                key_hash=key_hash,
                key_prefix="(reference)",
                rate_limit_per_min=rate_limit
                if isinstance(rate_limit, int) and rate_limit > 0
                else None,
                source="reference",
                description=text or "imported from the MCP Gateway Registry's metrics-service",
                created_at=_ms(created_at) or now,
                revoked_at=None if is_active in (1, True, None) else now,
            )
            counts["imported"] += 1
        _mark(conn, "api_keys", 0, True, counts)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return counts


def _items(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str | None, str | None], list[Any]]:
    """Reference rows -> ingest items, grouped by (service, version, instance)."""
    groups: dict[tuple[str, str | None, str | None], list[Any]] = {}
    for _, service, version, instance, kind, ts, value, duration, dims, meta in rows:
        try:
            dimensions = json.loads(dims) if dims else {}
            metadata = json.loads(meta) if meta else {}
        except ValueError:
            dimensions, metadata = {"unparsed": True}, {}
        item = {
            "type": kind,
            "timestamp": ts,
            "value": value,
            "duration_ms": duration,
            "dimensions": dimensions if isinstance(dimensions, dict) else {},
            "metadata": metadata if isinstance(metadata, dict) else {},
        }
        key = (str(service).lower(), version, instance)
        groups.setdefault(key, []).append(item)
    return groups


def _import_metrics(conn: sqlite3.Connection, validator: Any) -> dict[str, int]:
    from metrics_service.storage.sqlite.database import INSERT_SQL

    totals = {"imported": 0, "expired": 0, "rejected": 0}
    last_id, done = _progress(conn, "metrics")
    if done:
        return totals
    reasons: dict[str, int] = {}
    while True:
        rows = conn.execute(
            "SELECT id, service, service_version, instance_id, metric_type, timestamp, value,"
            " duration_ms, dimensions, metadata FROM reference_metrics WHERE id > ?"
            " ORDER BY id LIMIT ?",
            (last_id, CHUNK_ROWS),
        ).fetchall()
        counts = {"imported": 0, "expired": 0, "rejected": 0}
        parts: list[dict[str, list[tuple[Any, ...]]]] = []
        for (service, version, instance), items in _items(rows).items():
            for i in range(0, len(items), 1000):
                body: dict[str, Any] = {"service": service, "metrics": items[i : i + 1000]}
                if isinstance(version, str):
                    body["version"] = version[:64]
                if isinstance(instance, str):
                    body["instance_id"] = instance[:128]
                try:
                    batch = validator.decode(json.dumps(body).encode())
                except Exception as exc:  # the whole group is unusable (e.g. its service name)
                    counts["rejected"] += len(items[i : i + 1000])
                    reasons[str(exc)] = reasons.get(str(exc), 0) + 1
                    continue
                parts.append(batch.rows)
                counts["imported"] += batch.accepted
                for r in batch.rejections:
                    if r.rule == "older_than_retention":
                        counts["expired"] += 1
                    else:
                        counts["rejected"] += 1
                        reason = f"{r.field.split('.', 1)[-1]}: {r.rule}"
                        reasons[reason] = reasons.get(reason, 0) + 1
        last_id = rows[-1][0] if rows else last_id
        conn.execute("BEGIN IMMEDIATE")
        try:
            for part in parts:
                for kind, kind_rows in part.items():
                    conn.executemany(INSERT_SQL[kind], kind_rows)
            rollups.catch_up(conn)
            _mark(conn, "metrics", last_id, len(rows) < CHUNK_ROWS, counts)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for k in totals:
            totals[k] += counts[k]
        if len(rows) < CHUNK_ROWS:
            break
    if reasons:
        log.warning(
            "reference rows not imported (they stay in reference_metrics): %s",
            ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())),
        )
    return totals


def import_rows(conn: sqlite3.Connection, validator: Any) -> dict[str, dict[str, int]]:
    """Import what an adopted reference file holds and has not been imported yet (``validator``:
    a ``validation.Validator``); return the counts per source table."""
    out: dict[str, dict[str, int]] = {}
    if _has(conn, PREFIX + "api_keys") and not _progress(conn, "api_keys")[1]:
        out["api_keys"] = _import_keys(conn)
    if _has(conn, PREFIX + "metrics") and not _progress(conn, "metrics")[1]:
        out["metrics"] = _import_metrics(conn, validator)
    for table, counts in out.items():
        log.info(
            "imported from reference_%s: %s",
            table,
            ", ".join(f"{v} {k}" for k, v in counts.items()),
        )
    return out


def status(conn: sqlite3.Connection) -> dict[str, Any]:
    """The ``reference_*`` tables left and the import's progress."""
    tables = [t for t in _user_tables(conn) if t.startswith(PREFIX) and t != "reference_import"]
    imports = {
        name: {"done": bool(done), "imported": imported, "expired": expired, "rejected": rejected}
        for name, done, imported, expired, rejected in conn.execute(
            "SELECT name, done, imported, expired, rejected FROM reference_import ORDER BY name"
        )
    }
    return {"tables": tables, "imports": imports}


def drop_tables(conn: sqlite3.Connection) -> list[str]:
    """Drop the ``reference_*`` tables; refuses while an import is unfinished."""
    state = status(conn)
    pending = [
        name
        for name in ("api_keys", "metrics")
        if PREFIX + name in state["tables"] and not state["imports"].get(name, {}).get("done")
    ]
    if pending:
        raise RuntimeError(
            "the import of reference_" + ", reference_".join(pending) + " is not finished; "
            "start the service (or any metrics-service command) once to finish it"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table in state["tables"]:
            conn.execute(f'DROP TABLE "{table}"')
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return list(state["tables"])
