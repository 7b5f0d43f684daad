"""The PostgreSQL schema, versioned like SQLite's (``storage/migrations.py``) but its own list.

Version 1 is the schema SQLite reaches at its migration 7, written for PostgreSQL:

- the raw tables, partitioned by event time (``PARTITION BY RANGE (ts)``, one partition per UTC
  day, created ahead by the service: ``partitions.py``), ids from a sequence per table;
- the ``metrics`` view over every family, the dimensions as ``jsonb``;
- the rollup tables of every cube (``storage/rollups.py`` says what they aggregate), their day
  watermark, API keys with their service aliases, retention policies, idempotency keys.

``apply`` runs each missing version in its own transaction holding a transaction-level advisory
lock, so replicas starting at once on an empty database apply each version exactly once: the
second waits for the first to commit, then finds the version recorded in ``schema_migrations``.
Each version is frozen once released: add the next, never edit one.
"""

from __future__ import annotations

import time

from metrics_service.storage import rollups
from metrics_service.storage.postgres._conn import Conn
from metrics_service.validation import DIMENSIONS, METADATA_COLUMNS

#: The key of the advisory lock that serialises migrations (any fixed 64-bit number; this one
#: is "metrics" in ASCII).
MIGRATION_LOCK = 0x6D657472696373

TABLE_OF_TYPE = {
    "auth_request": "auth_metrics",
    "tool_execution": "tool_metrics",
    "tool_discovery": "discovery_metrics",
    "protocol_latency": "protocol_latency_metrics",
    "registry_operation": "registry_operation_metrics",
    "health_check": "health_check_metrics",
    "custom": "custom_metrics",
}
TABLES = tuple(TABLE_OF_TYPE.values())

#: Validation kind -> PostgreSQL type.
_PG_TYPE = {
    "str": "text",
    "code": "text",
    "bool": "integer",
    "count": "integer",
    "count_na": "integer",
    "ms": "double precision",
}
_COMMON = (
    ("ts", "bigint NOT NULL"),
    ("received_at", "bigint NOT NULL"),
    ("service", "text NOT NULL"),
    ("service_version", "text NOT NULL"),
    ("instance_id", "text"),
    ("value", "double precision NOT NULL"),
    ("duration_ms", "double precision"),
)


def row_columns(kind: str) -> list[str]:
    """The columns of a row of ``kind`` in the order validation builds it."""
    names = [name for name, _ in _COMMON]
    names += [name for name, _ in DIMENSIONS[kind]]
    if kind == "tool_execution":
        names += [name for name, _ in METADATA_COLUMNS]
    return [*names, "dimensions", "metadata"]


def _raw_table(kind: str) -> list[str]:
    table = TABLE_OF_TYPE[kind]
    typed = list(DIMENSIONS[kind])
    if kind == "tool_execution":
        typed += list(METADATA_COLUMNS)
    columns = [
        f"id bigint NOT NULL DEFAULT nextval('{table}_id_seq')",
        *(f"{name} {sql}" for name, sql in _COMMON),
        *(f"{name} {_PG_TYPE[k]}" for name, k in typed),
        "dimensions text",
        "metadata text",
    ]
    return [
        f"CREATE SEQUENCE {table}_id_seq AS bigint CACHE 64",
        f"CREATE TABLE {table} ({', '.join(columns)}) PARTITION BY RANGE (ts)",
        f"ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id",
        f"CREATE INDEX {table}_ts ON {table} (ts)",
    ]


def _bool(column: str) -> str:
    return f"CASE {column} WHEN 1 THEN true WHEN 0 THEN false END"


#: metric type -> the typed columns the view folds into ``dimensions`` (as SQLite's view does).
_VIEW_DIMENSIONS = {
    "auth_request": ("success", "method", "server", "user_hash", "error_code"),
    "tool_execution": (
        "method",
        "tool_name",
        "server_name",
        "client_name",
        "client_version",
        "success",
        "input_size_bytes",
        "output_size_bytes",
        "transport",
        "session_id",
        "server_path",
        "user_hash",
        "error_code",
        "protocol_version",
        "error_type",
    ),
    "tool_discovery": (
        "query",
        "results_count",
        "top_k",
        "top_n",
        "embedding_time_ms",
        "search_time_ms",
    ),
    "protocol_latency": ("flow_step", "server_name", "client_name", "session_id"),
    "registry_operation": (
        "operation",
        "resource_type",
        "success",
        "resource_id",
        "user_id",
        "error_code",
    ),
    "health_check": ("endpoint", "status_code", "healthy", "server_name", "error_code"),
    "custom": (),
}
_UTC = "to_timestamp(ts / 1000.0) AT TIME ZONE 'UTC'"


def _view() -> str:
    selects = []
    for kind, table in TABLE_OF_TYPE.items():
        pairs = []
        for column in _VIEW_DIMENSIONS[kind]:
            value = _bool(column) if column in ("success", "healthy") else column
            pairs.append(f"'{column}', {value}")
        typed = f"jsonb_strip_nulls(jsonb_build_object({', '.join(pairs)}))" if pairs else "'{}'"
        selects.append(
            f"SELECT '{kind}'::text AS type, id AS source_id, ts,"
            f' to_char({_UTC}, \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\') AS event_time, received_at,'
            " service, service_version, instance_id, value, duration_ms,"
            f" coalesce(dimensions::jsonb, '{{}}'::jsonb) || {typed}::jsonb AS dimensions,"
            f" metadata::jsonb AS metadata, '{kind}'::text AS metric_type,"
            f" to_char({_UTC}, 'YYYY-MM-DD HH24:MI:SS.MS') AS timestamp FROM {table}"
        )
    return "CREATE VIEW metrics AS " + " UNION ALL ".join(selects)


def _rollup_table(cube: rollups.Cube, level: str) -> str:
    dims = ", ".join(
        f"{d} {'integer' if d in ('success', 'healthy') else 'text'} NOT NULL" for d in cube.dims
    )
    states = []
    for column in cube.state_columns:
        if column.endswith(("_min", "_max")):
            states.append(f"{column} double precision")
        elif column == "calls" or column.endswith("_sum"):
            states.append(f"{column} double precision NOT NULL DEFAULT 0")
        else:
            states.append(f"{column} bigint NOT NULL DEFAULT 0")
    return (
        f"CREATE TABLE {cube.table(level)} (bucket bigint NOT NULL, {dims}, {', '.join(states)},"
        f" PRIMARY KEY (bucket, {', '.join(cube.dims)}))"
    )


_NOW_MS = "(extract(epoch FROM now()) * 1000)::bigint"


def _initial() -> list[str]:
    statements: list[str] = []
    for kind in TABLE_OF_TYPE:
        statements += _raw_table(kind)
    statements.append(_view())
    statements += [
        """CREATE TABLE api_keys (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            service text,
            role text NOT NULL CHECK (role IN ('ingest', 'admin', 'viewer')),
            key_hash text NOT NULL UNIQUE,
            key_prefix text NOT NULL,
            rate_limit_per_min integer,
            source text NOT NULL,
            description text,
            created_at bigint NOT NULL,
            revoked_at bigint,
            service_aliases text
        )""",
        "CREATE INDEX idx_api_keys_service ON api_keys (service)",
        """CREATE TABLE retention_policies (
            table_name text PRIMARY KEY,
            retention_days integer,
            enabled integer NOT NULL DEFAULT 1,
            updated_at bigint NOT NULL
        )""",
        "INSERT INTO retention_policies (table_name, updated_at) VALUES "
        + ", ".join(f"('{table}', 0)" for table in TABLES),
        """CREATE TABLE idempotency_keys (
            service text NOT NULL,
            key text NOT NULL,
            fingerprint text NOT NULL,
            status integer NOT NULL,
            response bytea NOT NULL,
            committed_at bigint NOT NULL,
            PRIMARY KEY (service, key)
        )""",
        "CREATE INDEX idx_idempotency_keys_committed_at ON idempotency_keys (committed_at)",
        "CREATE TABLE rollup_watermark (name text PRIMARY KEY, until_ms bigint NOT NULL)",
        f"INSERT INTO rollup_watermark VALUES"
        f" ('day', {_NOW_MS} / {rollups.DAY_MS} * {rollups.DAY_MS})",
    ]
    for cube in rollups.CUBES:
        for level in cube.levels:
            statements.append(_rollup_table(cube, level))
    return statements


MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema (SQLite's version 7, partitioned raw tables)", _initial()),
]
LATEST_VERSION = MIGRATIONS[-1][0]

_BOOKKEEPING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at bigint NOT NULL
)"""


async def current_version(conn: Conn) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def apply(conn: Conn) -> list[int]:
    """Apply the missing versions, each in a transaction under the advisory lock; return the
    versions this call applied."""
    applied: list[int] = []
    for version, name, statements in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_BOOKKEEPING)
            done = await conn.fetchval(
                "SELECT count(*) FROM schema_migrations WHERE version = $1", version
            )
            if done:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                version,
                name,
                int(time.time() * 1000),
            )
        applied.append(version)
    return applied
