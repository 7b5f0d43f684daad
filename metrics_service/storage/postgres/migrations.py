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

from metrics_service.storage import rollups, schema
from metrics_service.storage.postgres import rollups as pg_rollups
from metrics_service.storage.postgres._conn import Conn

#: The key of the advisory lock that serialises migrations (any fixed 64-bit number; this one
#: is "metrics" in ASCII).
MIGRATION_LOCK = 0x6D657472696373

TABLE_OF_TYPE = dict(schema.TABLE_OF_TYPE)
TABLES = schema.TABLES

#: The registry's logical column types (``schema.SQL_TYPE``) in PostgreSQL.
_PG_TYPE = {"integer": "integer", "real": "double precision", "text": "text"}
#: The common columns that are unix milliseconds: bigint, not integer.
_MS = {"ts", "received_at"}


def _pg_type(column: schema.Column) -> str:
    if column.name in _MS:
        return "bigint"
    return _PG_TYPE[column.sql_type]


def row_columns(kind: str) -> list[str]:
    """The columns of a row of ``kind`` in the order validation builds it (the registry's)."""
    return list(schema.FAMILY[kind].names)


#: The typed integer columns (counts, sizes, tokens, flags) that migration 4 made bigint:
#: validation takes counts up to 2**62, which integer cannot hold. Listed as they were then
#: (the registry's columns of SQLite's version 7 and before), so the migration never changes.
_WIDENED = {
    kind: tuple(
        c.name
        for c in schema.FAMILY[kind].columns
        if c.since <= 7 and c.name not in _MS and c.sql_type == "integer"
    )
    for kind in TABLE_OF_TYPE
}


def row_types(kind: str) -> list[str]:
    """The PostgreSQL type of each column of ``row_columns(kind)`` (as of the latest migration)."""
    return [
        "bigint" if c.name in _WIDENED[kind] else _pg_type(c) for c in schema.FAMILY[kind].columns
    ]


def _widen_integers() -> list[str]:
    """Migration 4: the typed integer columns of the raw tables to bigint (the partitions
    follow their table); the metrics view, which reads them, rebuilt around the change."""
    statements = ["DROP VIEW metrics"]
    for kind, table in TABLE_OF_TYPE.items():
        if _WIDENED[kind]:
            alters = ", ".join(f"ALTER COLUMN {c} TYPE bigint" for c in _WIDENED[kind])
            statements.append(f"ALTER TABLE {table} {alters}")
    statements.append(_view())
    return statements


def _raw_table(kind: str) -> list[str]:
    table = TABLE_OF_TYPE[kind]
    columns = [f"id bigint NOT NULL DEFAULT nextval('{table}_id_seq')"]
    for column in schema.FAMILY[kind].columns:
        columns.append(f"{column.name} {_pg_type(column)}{'' if column.nullable else ' NOT NULL'}")
    return [
        f"CREATE SEQUENCE {table}_id_seq AS bigint CACHE 64",
        f"CREATE TABLE {table} ({', '.join(columns)}) PARTITION BY RANGE (ts)",
        f"ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id",
        f"CREATE INDEX {table}_ts ON {table} (ts)",
    ]


def _bool(column: str) -> str:
    return f"CASE {column} WHEN 1 THEN true WHEN 0 THEN false END"


#: metric type -> the typed columns the view folds into ``dimensions`` (as SQLite's view does:
#: the dimensions, not the metadata columns).
_VIEW_DIMENSIONS = {f.kind: tuple(c.name for c in f.dimensions) for f in schema.FAMILIES}
_UTC = "to_timestamp(ts / 1000.0) AT TIME ZONE 'UTC'"


def _view() -> str:
    selects = []
    for kind, table in TABLE_OF_TYPE.items():
        pairs = []
        for column in _VIEW_DIMENSIONS[kind]:
            value = _bool(column) if column in rollups.INT_DIMS else column
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
        f"{d} {'integer' if d in rollups.INT_DIMS else 'text'} NOT NULL" for d in cube.dims
    )
    states = []
    for column in cube.state_columns:
        kind = _PG_TYPE[rollups.sql_type(column)]
        kind = "bigint" if kind == "integer" else kind
        default = "" if column.endswith(rollups.MIN_MAX) else " NOT NULL DEFAULT 0"
        states.append(f"{column} {kind}{default}")
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


#: Every statement that changes ``api_keys`` notifies the replicas' key listeners
#: (``listener.py``) when its transaction commits; one notice per transaction (PostgreSQL folds
#: equal ones).
KEY_CHANNEL = "metrics_keys"
_KEY_NOTIFY = [
    f"""CREATE FUNCTION metrics_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{KEY_CHANNEL}', '');
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys"
    " FOR EACH STATEMENT EXECUTE FUNCTION metrics_keys_changed()",
]

#: The ingest function's name: one call adds a group of rows and their rollups (migration 3).
INGEST_FUNCTION = "metrics_ingest"
#: The SQLSTATE it raises when an idempotency key it was to claim is already committed.
CLAIM_LOST = "MI001"


def claim_conflict(cutoff: str) -> str:
    """An idempotency claim wins when its key is new or was last committed before ``cutoff``
    (an SQL expression): the ``ON CONFLICT`` of every claiming ``INSERT``."""
    return (
        " ON CONFLICT (service, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
        " status = excluded.status, response = excluded.response,"
        f" committed_at = excluded.committed_at WHERE idempotency_keys.committed_at < {cutoff}"
    )


def _claims_and_rows() -> tuple[list[str], list[str]]:
    """The parameters and statements the ingest function of every version begins with: claim
    the idempotency keys (all of them, else raise ``CLAIM_LOST`` and write nothing: the caller
    claims one by one), insert the raw rows (NULL arrays skipped)."""
    params = ["p_cutoff bigint", "p_claims idempotency_keys[]"]
    body = [
        "IF p_claims IS NOT NULL THEN",
        "    INSERT INTO idempotency_keys SELECT * FROM unnest(p_claims)"
        f"{claim_conflict('p_cutoff')};",
        "    GET DIAGNOSTICS claimed = ROW_COUNT;",
        "    IF claimed < cardinality(p_claims) THEN",
        "        RAISE EXCEPTION 'an idempotency key is already committed'"
        f" USING ERRCODE = '{CLAIM_LOST}';",
        "    END IF;",
        "END IF;",
    ]
    for kind, table in TABLE_OF_TYPE.items():
        params.append(f"p_{table} {table}[]")
        columns = ", ".join(row_columns(kind))
        body.append(
            f"IF p_{table} IS NOT NULL THEN INSERT INTO {table} ({columns})"
            f" SELECT {columns} FROM unnest(p_{table}); END IF;"
        )
    return params, body


def _ingest_function() -> list[str]:
    """Migration 3's ``metrics_ingest(watermark, cutoff, idempotency_keys[], <raw table>[] per
    family, <rollup table>[] per rollup table)``: under the watermark's shared lock, if the day
    watermark is still ``watermark`` (the one the caller computed the rollup rows for), claim
    the keys, insert the raw rows and upsert the rollup rows; return the watermark, so a caller
    that guessed it wrong computes again (nothing was written). One statement: PL/pgSQL keeps
    the plans of its statements per connection, so the server plans each once, not per
    transaction. Migration 5 replaced it (``_ingest_function_v5``).

    The arrays are of the tables' own row types (a raw row with its id first, NULL): a later
    migration that adds a column or a cube drops this function and creates it anew."""
    params, body = _claims_and_rows()
    params.insert(0, "p_watermark bigint")
    for cube in rollups.CUBES:
        for level in cube.levels:
            table = cube.table(level)
            params.append(f"p_{table} {table}[]")
            body.append(
                f"IF p_{table} IS NOT NULL THEN INSERT INTO {table}"
                f" SELECT * FROM unnest(p_{table}){pg_rollups.conflict(cube, level)}; END IF;"
            )
    newline = "\n        "
    return [
        f"""CREATE FUNCTION {INGEST_FUNCTION}({", ".join(params)}) RETURNS bigint
    LANGUAGE plpgsql AS $$
    DECLARE
        current bigint;
        claimed bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({pg_rollups.WATERMARK_LOCK});
        SELECT until_ms INTO current FROM rollup_watermark WHERE name = 'day';
        IF current IS DISTINCT FROM p_watermark THEN
            RETURN current;
        END IF;
        {newline.join(body)}
        RETURN current;
    END $$"""
    ]


def _ingest_function_v5() -> list[str]:
    """Migration 5's ``metrics_ingest(cutoff, idempotency_keys[], <raw table>[] per family)``:
    under the insert lock (shared), the claims and the raw rows; the rollups are folded in
    later (``rollups.fold``). One statement, planned once per connection."""
    params, body = _claims_and_rows()
    newline = "\n        "
    return [
        f"""CREATE FUNCTION {INGEST_FUNCTION}({", ".join(params)}) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        claimed bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({pg_rollups.WATERMARK_LOCK});
        {newline.join(body)}
    END $$"""
    ]


def _fold_later() -> list[str]:
    """Migration 5: rollups folded in the background instead of in each insert transaction.

    ``rollup_folded`` holds per raw table the id up to which its rows are in the rollups; it
    starts at the last id handed out, read while no insert is open (they all held the lock
    taken first, shared, and the rollups of every row so far were written in its
    transaction). The sequences hand out ids one at a time (``CACHE 1``): an id cached by a
    session and used later would be below a mark already passed. Each raw table gets an index
    on ``id`` (the fold and the queries read the rows above the mark by it). The ingest
    function loses its rollup arguments and the watermark check, and the barrier function
    (``rollups.last_ids``) is new.

    Replicas of an older version must be stopped first: the ingest function they call is
    dropped here, so their inserts fail (and are retried by the clients) rather than add
    rollups that the fold would add again."""
    statements = [f"SELECT pg_advisory_xact_lock({pg_rollups.WATERMARK_LOCK})"]
    statements.append(
        "CREATE TABLE rollup_folded (table_name text PRIMARY KEY, until_id bigint NOT NULL)"
    )
    for table in TABLES:
        statements += [
            f"INSERT INTO rollup_folded VALUES ('{table}', {pg_rollups.last_id_sql(table)})",
            f"ALTER SEQUENCE {table}_id_seq CACHE 1",
            f"CREATE INDEX {table}_id ON {table} (id)",
        ]
    statements.append(f"DROP FUNCTION {INGEST_FUNCTION}")
    statements += _ingest_function_v5()
    last = ", ".join(pg_rollups.last_id_sql(table) for table in TABLES)
    statements.append(
        f"""CREATE FUNCTION {pg_rollups.BARRIER_FUNCTION}() RETURNS bigint[] LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({pg_rollups.WATERMARK_LOCK});
        RETURN ARRAY[{last}];
    END $$"""
    )
    return statements


MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema (SQLite's version 7, partitioned raw tables)", _initial()),
    (2, "NOTIFY metrics_keys when api_keys change", _KEY_NOTIFY),
    (
        3,
        "metrics_ingest(): a group's claims, rows and rollups in one call",
        _ingest_function(),
    ),
    (4, "typed integer columns of the raw tables to bigint", _widen_integers()),
    (5, "rollups folded in the background: rollup_folded marks, id indexes", _fold_later()),
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
