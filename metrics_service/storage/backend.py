"""The storage seam: the one async interface the service uses to reach its database.

Everything outside ``metrics_service/storage/`` talks to a :class:`StorageBackend`; nothing
there imports a database driver (``tests/test_storage_seam.py`` enforces it). A backend is a
class ``Backend(settings, url)`` in ``storage/<name>/`` (``storage/sqlite/``,
``storage/postgres/``), chosen by ``METRICS_DATABASE_URL`` in :func:`create_backend`.

The contract every backend keeps:

- **Errors** cross the seam only as the project's own exceptions: a database that refuses (locked,
  full, unreachable, I/O error) raises :class:`~metrics_service.errors.StorageError` (the API
  answers 503 with ``Retry-After``); a table name not in the whitelists raises ``ValueError``.
  No driver exception escapes a method.
- **Rows** are tuples in the layout of :mod:`metrics_service.storage.schema` (validation builds
  them); ``parts`` is one ``{metric type: [row, ...]}`` per request.
- **Atomicity**: :meth:`StorageBackend.insert_batches` commits the rows of every part, their
  rollup updates (:mod:`metrics_service.storage.rollups`: what is aggregated is shared, only the
  SQL is the backend's) and the idempotency claims in one transaction, or nothing.
- **Time** is integer unix milliseconds, UTC, everywhere.
- Construction opens nothing; :meth:`StorageBackend.open` connects and migrates, and
  :meth:`StorageBackend.close` releases everything (idempotent).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import SplitResult, urlsplit, urlunsplit

from metrics_service.errors import ConfigError

if TYPE_CHECKING:
    from metrics_service.idempotency import Claim, Stored
    from metrics_service.settings import Settings
    from metrics_service.storage.rollups import Cube, Query

T = TypeVar("T")

#: One request's accepted rows: metric type -> rows (``storage.schema`` layout).
Part = dict[str, list[tuple[Any, ...]]]
#: What :meth:`Reader.aggregate` answers: the cube the states are shaped by, the states per
#: group key ``(time bucket or 0, *group values)``, and the source (``rollup`` or ``raw``).
Aggregate = tuple["Cube", dict[tuple[Any, ...], list[Any]], str]

ENV = "METRICS_DATABASE_URL"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored (its secret never is: only the SHA-256 hex ``key_hash``)."""

    id: int
    service: str | None
    role: str
    key_hash: str
    key_prefix: str
    rate_limit_per_min: int | None
    source: str
    description: str | None
    created_at: int
    revoked_at: int | None
    #: Further service names this key may report as (``keys create --alias``).
    aliases: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the hash."""
        shown = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "key_hash"
        }
        return {**shown, "active": self.revoked_at is None, "aliases": list(self.aliases)}


@dataclass(frozen=True, slots=True)
class Policy:
    """A raw table's retention policy (``retention_days`` already defaulted)."""

    table: str
    retention_days: int
    is_default: bool
    enabled: bool


@runtime_checkable
class Reader(Protocol):
    """What an analytics view reads through: one consistent snapshot of the database."""

    async def aggregate(self, q: Query) -> Aggregate:
        """States per group over ``q``'s range, from the rollups where a cube covers the group
        and filters (whole days, whole hours, the raw rows at the ends), else the raw rows:
        exact over any range (``rollups.aggregate_plan`` and ``rollups.fold_rows`` are the
        shared logic)."""
        ...


@runtime_checkable
class StorageBackend(Protocol):
    """Everything the service, the CLI and the admin API need from a database."""

    #: ``sqlite`` or ``postgresql``.
    name: str
    #: Where the data is, for logs and ``db stats`` (a path, or a URL without its password).
    description: str
    #: Schema versions applied by the last :meth:`open` (empty when it was up to date).
    applied_migrations: list[int]
    #: Set before :meth:`open` to be called (on the event loop) when another process may have
    #: changed the keys; a backend that cannot tell (SQLite) never calls it.
    on_keys_changed: Callable[[], None] | None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, apply the missing migrations (exactly once, also against other processes
        starting at the same time) and finish any pending import. ``StorageError`` if the
        database cannot be reached or migrated (the message names ``METRICS_DATABASE_URL`` or
        ``SQLITE_DB_PATH``, never a password)."""
        ...

    async def close(self) -> None:
        """Release connections and threads; idempotent."""
        ...

    async def writable(self) -> bool:
        """Readiness: the database accepts writes now (writing nothing), answered within about
        a second. False, not an exception, when it does not."""
        ...

    # -- ingest --------------------------------------------------------------------------------

    async def insert_batches(
        self, parts: Sequence[Part], claims: Sequence[Claim | None] = ()
    ) -> int:
        """Insert the rows of several requests and their rollup updates in one transaction; all
        or nothing (a failure rolls back, so the caller may retry without duplicates). ``claims``
        (one per part, or empty) claims idempotency keys in the same transaction: a key already
        committed within its window sets ``claim.existing`` and its part is not inserted.
        Returns the number of rows inserted."""
        ...

    async def idempotency_lookup(self, service: str, key: str, window_s: float) -> Stored | None:
        """The committed record of ``key`` if it is within the window."""
        ...

    # -- keys ----------------------------------------------------------------------------------

    async def list_keys(self, *, active_only: bool = False) -> list[KeyRecord]:
        """Keys by id (the reload of the in-memory key table reads ``active_only``)."""
        ...

    async def create_key(
        self,
        *,
        service: str | None,
        role: str,
        key_hash: str,
        key_prefix: str,
        rate_limit_per_min: int | None,
        source: str,
        description: str | None = None,
        aliases: tuple[str, ...] = (),
    ) -> KeyRecord:
        """Store a new key (only its hash). ``StorageError`` if the hash exists."""
        ...

    async def revoke_key(self, key_id: int) -> KeyRecord | None:
        """Revoke by id (revoking twice keeps the first time); None if there is no such key."""
        ...

    async def rotate_key(
        self, key_id: int, *, key_hash: str, key_prefix: str, source: str
    ) -> tuple[KeyRecord, KeyRecord] | None:
        """In one transaction: revoke active key ``key_id`` and create its successor with the
        same service, role, aliases, rate limit and description. (revoked, new), or None if
        there is no active key with that id."""
        ...

    async def reconcile_env_keys(
        self, wanted: dict[tuple[str, str | None], tuple[str, str]]
    ) -> dict[str, Any]:
        """Make the active ``source='env'`` keys exactly ``wanted`` ((role, service) ->
        (key_hash, key_prefix)) in one transaction; a revoked secret stays revoked. Returns
        ``kept``, ``added``, ``revoked`` counts and ``refused``: [(role, service), ...]."""
        ...

    # -- retention and rollup upkeep -----------------------------------------------------------

    async def retention_policies(self, default_days: int) -> list[Policy]: ...

    async def set_retention_policy(
        self, tables: Sequence[str], retention_days: int | None, enabled: bool | None
    ) -> None:
        """Set the policy of each of ``tables`` (raw tables) in one transaction."""
        ...

    async def count_expired(self, table: str, before_ms: int) -> int:
        """Rows of ``table`` (a raw table: by event time; a rollup table: by bucket) before
        ``before_ms``."""
        ...

    async def delete_expired(self, table: str, before_ms: int, limit: int) -> int:
        """Delete about ``limit`` (at most ``limit`` for raw tables; whole buckets for rollup
        tables) rows of ``table`` before ``before_ms``, in one short transaction; return the
        number deleted (fewer than ``limit``: nothing left). A backend that drops whole
        partitions may delete more at once and reports what it dropped."""
        ...

    async def forget_idempotency_keys(self, before_ms: int, limit: int) -> int:
        """Delete up to ``limit`` idempotency keys committed before ``before_ms``."""
        ...

    async def compact_rollups(self, now_ms: int) -> int:
        """Fill the day rollups for every complete UTC day past the watermark (one transaction
        per day); return the number of days compacted."""
        ...

    # -- reads ---------------------------------------------------------------------------------

    async def analytics(self, view: Callable[[Reader], Awaitable[T]]) -> T:
        """Run ``view`` (one of ``analytics.queries.VIEWS``) against one snapshot: every query
        of the view sees the same commits."""
        ...

    async def stats(self) -> dict[str, Any]:
        """``db stats``: ``path`` (the description), ``rows`` per raw table, ``total_rows``,
        ``schema_version`` and the backend's size figures."""
        ...

    async def table_stats(self, default_days: int, rollup_days: int) -> dict[str, dict[str, Any]]:
        """Per raw and rollup table: ``record_count``, ``oldest_record``, ``newest_record`` (ISO
        or None), ``has_retention_policy``, ``retention_days``, ``policy_active``."""
        ...

    async def retention_preview(
        self, default_days: int, tables: Sequence[str] | None, now_s: float
    ) -> dict[str, dict[str, Any]]:
        """Per raw table with an enabled policy: what a cleanup would delete now
        (``retention_days``, ``records_to_delete``, ``total_records``,
        ``oldest_record_to_delete``, ``newest_record_to_delete``, ``cutoff_date``,
        ``percentage_to_delete``)."""
        ...

    async def database_size(self) -> dict[str, Any]:
        """Bytes on disk (``total_bytes`` and the backend's own parts)."""
        ...

    # -- the MCP Gateway Registry's SQL (docs/migrating.md) ------------------------------------

    async def reference_sql(self, enabled: bool | None = None) -> bool:
        """The text ``timestamp`` column the reference's documented SQL reads: switch it on or
        off (``None``: only ask); return whether it is on."""
        ...

    async def drop_reference(self) -> list[str]:
        """Drop the tables left by adopting a reference database; the names dropped.
        ``StorageError`` while their import is unfinished."""
        ...


def cutoff_ms(days: int, now_s: float | None = None) -> int:
    """The unix ms ``days`` days before ``now_s`` (default now): retention's cut-off."""
    now_s = time.time() if now_s is None else now_s
    return int((now_s - days * 86_400) * 1000)


def iso_ms(ms: int | None) -> str | None:
    """Unix ms as ISO 8601 in UTC (the admin answers' timestamps); None stays None."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def retention_preview_entry(
    retention_days: int,
    cutoff: int,
    expired: int,
    total: int,
    oldest: int | None,
    newest: int | None,
) -> dict[str, Any]:
    """One table's entry of ``retention_preview``, from its counts below and above ``cutoff``."""
    return {
        "retention_days": retention_days,
        "records_to_delete": expired,
        "total_records": total,
        "oldest_record_to_delete": iso_ms(oldest),
        "newest_record_to_delete": iso_ms(newest),
        "cutoff_date": iso_ms(cutoff),
        "percentage_to_delete": round(100.0 * expired / total, 2) if total else 0,
    }


# -- choosing a backend --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """``METRICS_DATABASE_URL`` parsed: ``scheme`` is ``sqlite`` or ``postgresql``."""

    scheme: str
    url: str  # as given (holds the password: never log it; log ``redacted``)
    path: str | None = None  # sqlite: the file

    @property
    def redacted(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(
            SplitResult(parts.scheme, f"{user}:***@{host}", parts.path, parts.query, "")
        )
    except ValueError:
        return "<unparseable URL>"


_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


def parse_database_url(value: str | None) -> DatabaseUrl | None:
    """None (unset or empty: SQLite at ``SQLITE_DB_PATH``), or the parsed URL; ``ConfigError``
    naming ``METRICS_DATABASE_URL`` for anything else (the password never in the message)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    shown = redact(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"{ENV}: cannot parse {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path (SQLAlchemy's form).
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ConfigError(
                f"{ENV}: {shown!r} is not a SQLite URL: use sqlite:///relative/file.db or "
                "sqlite:////absolute/file.db"
            )
        return DatabaseUrl("sqlite", value, path)
    if scheme in _POSTGRES_SCHEMES:
        if not parts.hostname and "host=" not in parts.query:
            raise ConfigError(f"{ENV}: {shown!r} names no host (postgresql://user@host/db)")
        if not parts.path.strip("/"):
            raise ConfigError(f"{ENV}: {shown!r} names no database (postgresql://user@host/db)")
        return DatabaseUrl("postgresql", value)
    raise ConfigError(
        f"{ENV}: unsupported scheme {parts.scheme or '(none)'!r} in {shown!r}: "
        "use postgresql://user:password@host:5432/db, sqlite:///path/to/file.db, "
        "or leave it unset for SQLite at SQLITE_DB_PATH"
    )


def create_backend(settings: Settings) -> StorageBackend:
    """The backend ``settings`` select (``METRICS_DATABASE_URL``), not yet opened.
    ``ConfigError`` naming the variable for a bad URL or a backend that is not installed."""
    url = parse_database_url(settings.database_url)
    if url is None or url.scheme == "sqlite":
        from metrics_service.storage.sqlite import SqliteBackend

        if url is not None and url.path is not None:
            from pathlib import Path

            settings = settings.model_copy(update={"db_path": Path(url.path)})
        sqlite_backend: StorageBackend = SqliteBackend(settings)
        return sqlite_backend
    try:
        from metrics_service.storage import postgres  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        raise ConfigError(
            f"{ENV}: {url.redacted!r} selects PostgreSQL, but the PostgreSQL backend is not "
            f"available in this installation ({exc}); unset {ENV} to use SQLite at "
            "SQLITE_DB_PATH"
        ) from None
    backend: StorageBackend = postgres.Backend(settings, url)
    return backend
