"""Versioned schema migrations, applied at start-up.

Each migration is literal SQL frozen at the version it was released in: never edit one that has
shipped, add the next. ``apply`` runs every missing migration inside one ``BEGIN IMMEDIATE``
transaction per version, so concurrent starts cannot apply one twice and a failure leaves the
database at the previous version. ``PRAGMA user_version`` holds the version.

Timestamps are integer unix milliseconds, UTC: ``ts`` is the event time, ``received_at`` the time
the service received the event.
"""

from __future__ import annotations

import sqlite3
import time

from metrics_service.storage import schema
from metrics_service.storage.sqlite import rollups
from metrics_service.storage.sqlite.transaction import write_transaction

_COMMON = """
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    service TEXT NOT NULL,
    service_version TEXT NOT NULL,
    instance_id TEXT,
    value REAL NOT NULL,
    duration_ms REAL,"""

_TAIL = """
    dimensions TEXT,
    metadata TEXT"""

_ISO = "strftime('%Y-%m-%dT%H:%M:%fZ', ts / 1000.0, 'unixepoch')"


def _view_part(kind: str, table: str, typed: str) -> str:
    return f"""
    SELECT '{kind}' AS type, id AS source_id, ts, {_ISO} AS event_time, received_at,
           service, service_version, instance_id, value, duration_ms,
           json_patch(coalesce(dimensions, '{{}}'), json_object({typed})) AS dimensions, metadata
    FROM {table}"""


_BOOL = "json(CASE success WHEN 1 THEN 'true' WHEN 0 THEN 'false' END)"

#: The event time as the MCP Gateway Registry's metrics-service stored it (text, UTC), so that its
#: documented SQL (``datetime(timestamp)``, ``timestamp > datetime('now', '-24 hours')``) runs.
#: In the ``metrics`` view always; as a column of the raw tables only on request
#: (``storage.reference.enable_sql_columns``): SQLite computes generated columns on every insert.
TEXT_TIME = "strftime('%Y-%m-%d %H:%M:%f', ts / 1000.0, 'unixepoch')"


def compat_column(table: str, column: str, kind: str, expression: str) -> str:
    """A virtual generated column: nothing stored; SQLite evaluates it on insert too (an alias
    of another column costs nothing measurable, a date function about 1 us per row)."""
    return (
        f"ALTER TABLE {table} ADD COLUMN {column} {kind} GENERATED ALWAYS AS ({expression}) VIRTUAL"
    )


def _bool(column: str) -> str:
    return f"json(CASE {column} WHEN 1 THEN 'true' WHEN 0 THEN 'false' END)"


def _view_v5(tool_extra: str = "") -> str:
    """The ``metrics`` view of migration 5: every family, plus the reference's column names
    ``metric_type`` and ``timestamp``. Later migrations that add typed tool_metrics columns
    rebuild it with those (``tool_extra``: more ``'name', column`` pairs)."""
    parts = [
        (
            "auth_request",
            "auth_metrics",
            f"'success', {_BOOL}, 'method', method, 'server', server, 'user_hash', user_hash,"
            " 'error_code', error_code",
        ),
        (
            "tool_execution",
            "tool_metrics",
            "'method', method, 'tool_name', tool_name, 'server_name', server_name,"
            " 'client_name', client_name, 'client_version', client_version,"
            f" 'success', {_BOOL}, 'input_size_bytes', input_size_bytes,"
            " 'output_size_bytes', output_size_bytes, 'transport', transport,"
            " 'session_id', session_id, 'server_path', server_path, 'user_hash', user_hash,"
            " 'error_code', error_code" + tool_extra,
        ),
        (
            "tool_discovery",
            "discovery_metrics",
            "'query', query, 'results_count', results_count, 'top_k', top_k, 'top_n', top_n,"
            " 'embedding_time_ms', embedding_time_ms, 'search_time_ms', search_time_ms",
        ),
        (
            "protocol_latency",
            "protocol_latency_metrics",
            "'flow_step', flow_step, 'server_name', server_name, 'client_name', client_name,"
            " 'session_id', session_id",
        ),
        (
            "registry_operation",
            "registry_operation_metrics",
            "'operation', operation, 'resource_type', resource_type,"
            f" 'success', {_BOOL}, 'resource_id', resource_id, 'user_id', user_id,"
            " 'error_code', error_code",
        ),
        (
            "health_check",
            "health_check_metrics",
            "'endpoint', endpoint, 'status_code', status_code,"
            f" 'healthy', {_bool('healthy')}, 'server_name', server_name,"
            " 'error_code', error_code",
        ),
        ("custom", "custom_metrics", ""),
    ]
    return _view(parts)


def _view(parts: list[tuple[str, str, str]]) -> str:
    selects = []
    for kind, table, typed in parts:
        selects.append(
            f"""
    SELECT '{kind}' AS type, id AS source_id, ts, {_ISO} AS event_time, received_at,
           service, service_version, instance_id, value, duration_ms,
           json_patch(coalesce(dimensions, '{{}}'), json_object({typed})) AS dimensions, metadata,
           '{kind}' AS metric_type, {TEXT_TIME} AS timestamp
    FROM {table}"""
        )
    return "CREATE VIEW metrics AS" + " UNION ALL".join(selects)


def migration_v5() -> list[str]:
    """Drop-in compatibility with the MCP Gateway Registry's metrics-service (docs/migrating.md):
    its two further metric families with their rollups, the typed columns its clients send, its
    column names for ours (virtual aliases), and key aliases."""
    return [
        "ALTER TABLE auth_metrics ADD COLUMN error_code TEXT",
        "ALTER TABLE tool_metrics ADD COLUMN server_path TEXT",
        "ALTER TABLE tool_metrics ADD COLUMN user_hash TEXT",
        "ALTER TABLE tool_metrics ADD COLUMN error_code TEXT",
        f"CREATE TABLE registry_operation_metrics ({_COMMON}"
        " operation TEXT, resource_type TEXT, success INTEGER, resource_id TEXT, user_id TEXT,"
        " error_code TEXT," + _TAIL + ")",
        "CREATE INDEX idx_registry_operation_metrics_ts ON registry_operation_metrics (ts)",
        f"CREATE TABLE health_check_metrics ({_COMMON}"
        " endpoint TEXT, status_code INTEGER, healthy INTEGER, server_name TEXT,"
        " error_code TEXT," + _TAIL + ")",
        "CREATE INDEX idx_health_check_metrics_ts ON health_check_metrics (ts)",
        compat_column("discovery_metrics", "top_k_services", "INTEGER", "top_k"),
        compat_column("discovery_metrics", "top_n_tools", "INTEGER", "top_n"),
        compat_column("discovery_metrics", "faiss_search_time_ms", "REAL", "search_time_ms"),
        "DROP VIEW metrics",
        _view_v5(),
        "INSERT INTO retention_policies (table_name, updated_at) VALUES"
        " ('registry_operation_metrics', 0), ('health_check_metrics', 0)",
        "ALTER TABLE api_keys ADD COLUMN service_aliases TEXT",
        # Progress of importing an adopted reference database (storage/reference.py).
        """CREATE TABLE reference_import (
            name TEXT PRIMARY KEY,
            last_id INTEGER NOT NULL,
            done INTEGER NOT NULL,
            imported INTEGER NOT NULL DEFAULT 0,
            expired INTEGER NOT NULL DEFAULT 0,
            rejected INTEGER NOT NULL DEFAULT 0,
            updated_at INTEGER NOT NULL
        )""",
        *rollups.migration_v5(),
    ]


MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "initial schema",
        [
            f"CREATE TABLE auth_metrics ({_COMMON}"
            " success INTEGER, method TEXT, server TEXT, user_hash TEXT," + _TAIL + ")",
            "CREATE INDEX idx_auth_metrics_ts ON auth_metrics (ts)",
            "CREATE INDEX idx_auth_metrics_success ON auth_metrics (success, ts)",
            "CREATE INDEX idx_auth_metrics_user_hash ON auth_metrics (user_hash, ts)",
            f"CREATE TABLE tool_metrics ({_COMMON}"
            " method TEXT, tool_name TEXT, server_name TEXT, client_name TEXT, client_version TEXT,"
            " success INTEGER, input_size_bytes INTEGER, output_size_bytes INTEGER,"
            " transport TEXT, session_id TEXT,"
            " agent_id TEXT, tenant_id TEXT, input_tokens INTEGER, output_tokens INTEGER,"
            + _TAIL
            + ")",
            "CREATE INDEX idx_tool_metrics_ts ON tool_metrics (ts)",
            "CREATE INDEX idx_tool_metrics_tool_name ON tool_metrics (tool_name, ts)",
            "CREATE INDEX idx_tool_metrics_client_name ON tool_metrics (client_name, ts)",
            "CREATE INDEX idx_tool_metrics_method ON tool_metrics (method, ts)",
            f"CREATE TABLE discovery_metrics ({_COMMON}"
            " query TEXT, results_count INTEGER, top_k INTEGER, top_n INTEGER,"
            " embedding_time_ms REAL, search_time_ms REAL," + _TAIL + ")",
            "CREATE INDEX idx_discovery_metrics_ts ON discovery_metrics (ts)",
            "CREATE INDEX idx_discovery_metrics_results_count ON discovery_metrics (results_count)",
            f"CREATE TABLE protocol_latency_metrics ({_COMMON}"
            " flow_step TEXT, server_name TEXT, client_name TEXT, session_id TEXT," + _TAIL + ")",
            "CREATE INDEX idx_protocol_latency_metrics_ts ON protocol_latency_metrics (ts)",
            "CREATE INDEX idx_protocol_latency_metrics_flow_step"
            " ON protocol_latency_metrics (flow_step, ts)",
            f"CREATE TABLE custom_metrics ({_COMMON}" + _TAIL + ")",
            "CREATE INDEX idx_custom_metrics_ts ON custom_metrics (ts)",
            "CREATE VIEW metrics AS"
            + _view_part(
                "auth_request",
                "auth_metrics",
                f"'success', {_BOOL}, 'method', method, 'server', server, 'user_hash', user_hash",
            )
            + " UNION ALL"
            + _view_part(
                "tool_execution",
                "tool_metrics",
                "'method', method, 'tool_name', tool_name, 'server_name', server_name,"
                " 'client_name', client_name, 'client_version', client_version,"
                f" 'success', {_BOOL}, 'input_size_bytes', input_size_bytes,"
                " 'output_size_bytes', output_size_bytes, 'transport', transport,"
                " 'session_id', session_id",
            )
            + " UNION ALL"
            + _view_part(
                "tool_discovery",
                "discovery_metrics",
                "'query', query, 'results_count', results_count, 'top_k', top_k, 'top_n', top_n,"
                " 'embedding_time_ms', embedding_time_ms, 'search_time_ms', search_time_ms",
            )
            + " UNION ALL"
            + _view_part(
                "protocol_latency",
                "protocol_latency_metrics",
                "'flow_step', flow_step, 'server_name', server_name, 'client_name', client_name,"
                " 'session_id', session_id",
            )
            + " UNION ALL"
            + _view_part("custom", "custom_metrics", ""),
            """CREATE TABLE api_keys (
                id INTEGER PRIMARY KEY,
                service TEXT,
                role TEXT NOT NULL CHECK (role IN ('ingest', 'admin', 'viewer')),
                key_hash TEXT NOT NULL UNIQUE,
                key_prefix TEXT NOT NULL,
                rate_limit_per_min INTEGER,
                source TEXT NOT NULL,
                description TEXT,
                created_at INTEGER NOT NULL,
                revoked_at INTEGER
            )""",
            "CREATE INDEX idx_api_keys_service ON api_keys (service)",
            """CREATE TABLE retention_policies (
                table_name TEXT PRIMARY KEY,
                retention_days INTEGER,
                enabled INTEGER NOT NULL DEFAULT 1,
                updated_at INTEGER NOT NULL
            )""",
            "INSERT INTO retention_policies (table_name, updated_at) VALUES"
            " ('auth_metrics', 0), ('tool_metrics', 0), ('discovery_metrics', 0),"
            " ('protocol_latency_metrics', 0), ('custom_metrics', 0)",
            """CREATE TABLE schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at INTEGER NOT NULL
            )""",
        ],
    ),
    # Rollup tables for analytics, filled from the raw rows already stored (see rollups.py).
    (2, "rollups", rollups.migration_v2()),
    # Queries by tool, client, method, user or flow step read the rollups (or the raw rows of a
    # time range, through the ts index). These secondary indexes only made every insert dearer:
    # dropping them nearly halves the cost of storing a metric (README, performance).
    (
        3,
        "drop secondary indexes on raw tables",
        [
            f"DROP INDEX IF EXISTS {name}"
            for name in (
                "idx_auth_metrics_success",
                "idx_auth_metrics_user_hash",
                "idx_tool_metrics_tool_name",
                "idx_tool_metrics_client_name",
                "idx_tool_metrics_method",
                "idx_discovery_metrics_results_count",
                "idx_protocol_latency_metrics_flow_step",
            )
        ],
    ),
    # Tool and client together (``tools?client=``, ``clients?tool=``) read raw rows without it.
    (4, "rollup cube by tool and client", rollups.migration_v4()),
    # The MCP Gateway Registry's metric families, columns and key aliases (docs/migrating.md).
    (5, "reference compatibility", migration_v5()),
    # Idempotency-Key: the keys of committed batches per service, claimed in the transaction
    # that stores the batch, with the answer its first attempt got (metrics_service/idempotency).
    (
        6,
        "idempotency keys",
        [
            """CREATE TABLE idempotency_keys (
                service TEXT NOT NULL,
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                status INTEGER NOT NULL,
                response BLOB NOT NULL,
                committed_at INTEGER NOT NULL,
                PRIMARY KEY (service, key)
            )""",
            "CREATE INDEX idx_idempotency_keys_committed_at ON idempotency_keys (committed_at)",
        ],
    ),
    # The OpenTelemetry MCP semantic conventions on tool rows (docs/otlp.md): posted events carry
    # them as dimensions protocol_version, error_type and metadata trace_id, span_id; OTLP spans
    # fill the same columns. The view shows the two new dimensions like the others.
    (
        7,
        "tool_execution semconv columns",
        [
            *(
                f"ALTER TABLE tool_metrics ADD COLUMN {name} TEXT"
                for name in ("protocol_version", "error_type", "trace_id", "span_id")
            ),
            "DROP VIEW metrics",
            _view_v5(", 'protocol_version', protocol_version, 'error_type', error_type"),
        ],
    ),
    # Rollups folded in every so often rather than by every commit: the id of the last raw row
    # each rollup has, per raw table (storage/sqlite/rollups.py, "folding").
    (8, "rollup fold marks", rollups.migration_v8()),
]


def registry_view() -> str:
    """The ``metrics`` view built from the column registry (``storage/schema.py``): every
    family's typed dimension columns. It is the view of migration 7 exactly (a test says so);
    the generated migrations below rebuild the view with it."""
    return _view(
        [
            (
                f.kind,
                f.table,
                ", ".join(
                    f"'{c.name}', {_bool(c.name) if c.kind == 'bool' else c.name}"
                    for c in f.dimensions
                ),
            )
            for f in schema.FAMILIES
        ]
    )


def typed_columns_migration(version: int) -> list[str]:
    """A migration generated from the column registry: the typed columns it marks ``since``
    ``version``, and the ``metrics`` view rebuilt with them."""
    return [
        *(
            f"ALTER TABLE {table} ADD COLUMN {c.name} {c.sql_type.upper()}"
            for table, c in schema.added_in(version)
        ),
        "DROP VIEW metrics",
        registry_view(),
    ]


#: The last migration written out above; a typed column added to the registry with a later
#: ``since`` gets its migration generated (adding a typed column is a change in one place).
WRITTEN_VERSION = MIGRATIONS[-1][0]
MIGRATIONS += [
    (
        version,
        "typed columns " + ", ".join(f"{t}.{c.name}" for t, c in schema.added_in(version)),
        typed_columns_migration(version),
    )
    for version in schema.versions()
    if version > WRITTEN_VERSION
]
LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def apply(conn: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations; return the versions applied. ``conn`` is in autocommit."""
    applied: list[int] = []
    for version, name, statements in MIGRATIONS:
        if current_version(conn) >= version:
            continue
        with write_transaction(conn):
            # Read again under the write lock: another process may have just migrated.
            if current_version(conn) >= version:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, int(time.time() * 1000)),
            )
            conn.execute(f"PRAGMA user_version = {int(version)}")
        applied.append(version)
    return applied
