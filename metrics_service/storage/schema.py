"""The column registry: the one description of a stored metric row.

Validation builds rows in this layout, every backend inserts them in this layout, the rollups and
telemetry read values by the positions computed here. A row of family ``kind`` is a tuple::

    (*COMMON, *family.dimensions, *family.metadata, dimensions_json, metadata_json)

- ``COMMON``: the columns of every family (event time, receive time, service, value, ...);
- ``family.dimensions``: the typed columns filled from ``dimensions`` (in this order);
- ``family.metadata``: the typed columns filled from ``metadata`` (tool executions only);
- the two JSON columns: the dimensions without a typed column, and the metadata as sent.

Adding a typed column is one ``Column(...)`` line here, with ``since`` the next schema version:
each backend generates that version's migration from ``added_in`` (SQLite:
``storage/sqlite/migrations.py``, ``typed_columns_migration``), and validation, inserts, the
``metrics`` view, rollups and telemetry follow by name and position.
Nothing here imports a database driver; ``tests/test_storage_seam.py`` checks that every
consumer agrees with this registry and with the tables the SQLite migrations create.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

#: Validation kind -> SQL type (the logical type; each backend spells it in its dialect).
SQL_TYPE = {
    "int": "integer",  # unix ms
    "real": "real",
    "text": "text",
    "str": "text",  # a bounded string from the payload
    "code": "text",  # an error code: string or integer, stored as text
    "bool": "integer",  # 0 / 1
    "count": "integer",  # a non-negative integer
    "count_na": "integer",  # a count that may be -1 (not available)
    "ms": "real",  # a duration in milliseconds
    "json": "text",
}


@dataclass(frozen=True, slots=True)
class Column:
    """One stored column: its name, how validation checks it (``kind``) and the schema version
    that added it (``since``; 1 for the initial schema)."""

    name: str
    kind: str
    since: int = 1
    nullable: bool = True

    @property
    def sql_type(self) -> str:
        return SQL_TYPE[self.kind]


#: Every family's first columns, in row order.
COMMON: tuple[Column, ...] = (
    Column("ts", "int", nullable=False),  # event time, unix ms
    Column("received_at", "int", nullable=False),  # receive time, unix ms
    Column("service", "text", nullable=False),
    Column("service_version", "text", nullable=False),
    Column("instance_id", "text"),
    Column("value", "real", nullable=False),
    Column("duration_ms", "real"),
)
#: Every family's last columns: the JSON of the untyped dimensions and of the metadata.
TAIL: tuple[Column, ...] = (Column("dimensions", "json"), Column("metadata", "json"))


@dataclass(frozen=True, slots=True)
class Family:
    """One metric type: its raw table and typed columns."""

    kind: str
    table: str
    dimensions: tuple[Column, ...] = ()
    metadata: tuple[Column, ...] = ()

    @property
    def columns(self) -> tuple[Column, ...]:
        """Every column of a row, in row order."""
        return (*COMMON, *self.dimensions, *self.metadata, *TAIL)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def positions(self) -> dict[str, int]:
        """Column name -> position in a row."""
        return {name: i for i, name in enumerate(self.names)}

    def typed(self, name: str) -> Column:
        for column in (*self.dimensions, *self.metadata):
            if column.name == name:
                return column
        raise KeyError(f"{self.kind} has no typed column {name!r}")


_S7 = 7  # migration 7: the OpenTelemetry MCP semantic conventions on tool rows

FAMILIES: tuple[Family, ...] = (
    Family(
        "auth_request",
        "auth_metrics",
        (
            Column("success", "bool"),
            Column("method", "str"),
            Column("server", "str"),
            Column("user_hash", "str"),
            Column("error_code", "code", since=5),
        ),
    ),
    Family(
        "tool_execution",
        "tool_metrics",
        (
            Column("method", "str"),
            Column("tool_name", "str"),
            Column("server_name", "str"),
            Column("client_name", "str"),
            Column("client_version", "str"),
            Column("success", "bool"),
            Column("input_size_bytes", "count"),
            Column("output_size_bytes", "count"),
            Column("transport", "str"),
            Column("session_id", "str"),
            Column("server_path", "str", since=5),
            Column("user_hash", "str", since=5),
            Column("error_code", "code", since=5),
            # mcp.protocol.version; error.type (a JSON-RPC error code, "tool_error" or an
            # exception name).
            Column("protocol_version", "str", since=_S7),
            Column("error_type", "str", since=_S7),
        ),
        (
            Column("agent_id", "str"),
            Column("tenant_id", "str"),
            Column("input_tokens", "count"),
            Column("output_tokens", "count"),
            # The span a tool_execution row came from (hex, as in OTLP/JSON and W3C).
            Column("trace_id", "str", since=_S7),
            Column("span_id", "str", since=_S7),
        ),
    ),
    Family(
        "tool_discovery",
        "discovery_metrics",
        (
            Column("query", "str"),
            Column("results_count", "count_na"),
            Column("top_k", "count"),
            Column("top_n", "count"),
            Column("embedding_time_ms", "ms"),
            Column("search_time_ms", "ms"),
        ),
    ),
    Family(
        "protocol_latency",
        "protocol_latency_metrics",
        (
            Column("flow_step", "str"),
            Column("server_name", "str"),
            Column("client_name", "str"),
            Column("session_id", "str"),
        ),
    ),
    # Operations on the registry's resources (the MCP Gateway Registry's middleware sends them).
    Family(
        "registry_operation",
        "registry_operation_metrics",
        (
            Column("operation", "str", since=5),
            Column("resource_type", "str", since=5),
            Column("success", "bool", since=5),
            Column("resource_id", "str", since=5),
            Column("user_id", "str", since=5),
            Column("error_code", "code", since=5),
        ),
    ),
    # Health checks of MCP servers by the registry.
    Family(
        "health_check",
        "health_check_metrics",
        (
            Column("endpoint", "str", since=5),
            Column("status_code", "count", since=5),
            Column("healthy", "bool", since=5),
            Column("server_name", "str", since=5),
            Column("error_code", "code", since=5),
        ),
    ),
    Family("custom", "custom_metrics"),
)

FAMILY: MappingProxyType[str, Family] = MappingProxyType({f.kind: f for f in FAMILIES})
#: metric type -> raw table.
TABLE_OF_TYPE: MappingProxyType[str, str] = MappingProxyType({f.kind: f.table for f in FAMILIES})
#: The raw tables (a whitelist: table names in SQL come from here, never from input).
TABLES: tuple[str, ...] = tuple(TABLE_OF_TYPE.values())
#: metric type -> (dimension name, validation kind), in column order.
DIMENSIONS: MappingProxyType[str, tuple[tuple[str, str], ...]] = MappingProxyType(
    {f.kind: tuple((c.name, c.kind) for c in f.dimensions) for f in FAMILIES}
)
#: The metadata keys with typed columns (tool executions).
METADATA_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (c.name, c.kind) for c in FAMILY["tool_execution"].metadata
)
#: Positions shared by every family.
TS, RECEIVED_AT, SERVICE, SERVICE_VERSION, INSTANCE_ID, VALUE, DURATION_MS = range(len(COMMON))
#: Where the typed columns start in every row.
FIRST_TYPED = len(COMMON)


def row_positions(kind: str) -> dict[str, int]:
    """Column name -> position in a row of ``kind``, every column (the two JSON columns last)."""
    return FAMILY[kind].positions


def versions() -> list[int]:
    """The schema versions that add typed columns, in order."""
    return sorted({c.since for f in FAMILIES for c in (*f.dimensions, *f.metadata)})


def added_in(version: int) -> list[tuple[str, Column]]:
    """(table, column) for every typed column that schema ``version`` adds: what a backend's
    migration for that version creates."""
    return [
        (f.table, c) for f in FAMILIES for c in (*f.dimensions, *f.metadata) if c.since == version
    ]
