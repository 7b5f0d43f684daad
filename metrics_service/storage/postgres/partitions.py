"""Daily partitions of the raw tables: created ahead, dropped whole by retention.

A raw table is ``PARTITION BY RANGE (ts)``; partition ``<table>_dYYYYMMDD`` holds the UTC day
``[start, start + 1 day)``. There is no default partition (a row outside every partition would
be refused, and a default partition holding rows of a day blocks creating that day's
partition), so the service makes sure a day's partitions exist before it inserts rows of that
day: the days around today ahead of time (``ensure_ahead``, at start and on each upkeep tick), a
late or early event's day on demand (``ensure``). Creating one is serialised across replicas by
an advisory lock, and the partitions known are cached per process.

Retention detaches a partition wholly before the cutoff ``CONCURRENTLY`` (no lock that stops
inserts into the other partitions) and drops it; rows before the cutoff inside the partition
that holds the cutoff are deleted, so the result is the same as SQLite's row deletes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.postgres.migrations import TABLES
from metrics_service.storage.rollups import DAY_MS

PARTITION_LOCK = 0x7061727469  # "parti"
#: Days created ahead of today (and kept behind it) by ``ensure_ahead``.
AHEAD_DAYS = 2


def name(table: str, day_ms: int) -> str:
    return f"{table}_d{datetime.fromtimestamp(day_ms / 1000, UTC):%Y%m%d}"


def day_of(partition: str) -> int:
    stamp = datetime.strptime(partition.rsplit("_d", 1)[1], "%Y%m%d").replace(tzinfo=UTC)
    return int(stamp.timestamp() * 1000)


class Partitions:
    """The partitions of every raw table, as far as this process knows them."""

    def __init__(self) -> None:
        self.known: set[tuple[str, int]] = set()

    async def load(self, conn: Conn) -> None:
        rows = await conn.fetch(
            "SELECT p.relname AS parent, c.relname AS child FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname = ANY($1::text[])",
            list(TABLES),
        )
        self.known = {(r["parent"], day_of(r["child"])) for r in rows}

    def missing(self, wanted: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        return {w for w in wanted if w not in self.known}

    async def ensure(self, conn: Conn, wanted: Iterable[tuple[str, int]]) -> int:
        """Create the partitions of ``wanted`` (table, day start) that do not exist; return
        how many this call created."""
        missing = self.missing(wanted)
        if not missing:
            return 0
        created = 0
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            for table, day in sorted(missing):
                part = name(table, day)
                exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", part)
                if not exists:
                    await conn.execute(
                        f"CREATE TABLE {part} PARTITION OF {table}"
                        f" FOR VALUES FROM ({day}) TO ({day + DAY_MS})"
                    )
                    created += 1
        self.known |= missing
        return created

    async def ensure_ahead(self, conn: Conn, now_ms: int | None = None) -> int:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        today = now_ms // DAY_MS * DAY_MS
        days = [today + i * DAY_MS for i in range(-1, AHEAD_DAYS + 1)]
        return await self.ensure(conn, ((t, d) for t in TABLES for d in days))

    async def expired(self, conn: Conn, table: str, before_ms: int) -> list[str]:
        """The partitions of ``table`` that lie wholly before ``before_ms``."""
        await self.load(conn)
        return [
            name(t, day)
            for t, day in sorted(self.known)
            if t == table and day + DAY_MS <= before_ms
        ]

    async def drop(self, conn: Conn, table: str, partition: str) -> int:
        """Detach ``partition`` without blocking inserts, then drop it; the rows it held."""
        rows = int(await conn.fetchval(f"SELECT count(*) FROM {partition}"))
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {partition} CONCURRENTLY")
        await conn.execute(f"DROP TABLE {partition}")
        self.known.discard((table, day_of(partition)))
        return rows
