"""Retention: delete metrics older than each table's policy, by event time, in bounded chunks.

Each chunk is one short transaction (``StorageBackend.delete_expired``; on SQLite, on the writer
thread, queued behind and in front of ingest commits), so a large backlog never blocks ingest
for longer than one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from metrics_service.settings import Settings
from metrics_service.storage import rollups
from metrics_service.storage.backend import StorageBackend, cutoff_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TableResult:
    table: str
    retention_days: int
    cutoff_ms: int
    rows: int  # deleted, or that would be deleted in a dry run
    enabled: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "table": self.table,
            "retention_days": self.retention_days,
            "cutoff": self.cutoff_ms,
            "rows": self.rows,
            "enabled": self.enabled,
        }


def pause_after(chunk_s: float, share: float) -> float:
    """The pause after a chunk that took ``chunk_s`` so that deleting takes ``share`` of the
    time."""
    return chunk_s * (1 / share - 1)


async def _delete_expired(
    settings: Settings,
    table: str,
    cutoff: int,
    delete_chunk: Callable[[str, int, int], Awaitable[int]],
    on_deleted: Callable[[str, int], None] | None,
) -> int:
    """Delete ``table``'s rows older than ``cutoff`` by ``delete_chunk(table, cutoff, limit)``,
    one short transaction per chunk; after each full chunk (a backlog) pause so that deleting
    leaves the writer to ingest for most of the time (``METRICS_RETENTION_MAX_SHARE``; README,
    performance)."""
    limit = settings.retention_chunk_rows
    deleted = 0
    while True:
        started = time.perf_counter()
        chunk = await delete_chunk(table, cutoff, limit)
        deleted += chunk
        if on_deleted is not None and chunk:
            on_deleted(table, chunk)
        if chunk < limit:
            return deleted
        await asyncio.sleep(
            pause_after(time.perf_counter() - started, settings.retention_max_share)
        )


async def run_once(
    storage: StorageBackend,
    settings: Settings,
    *,
    dry_run: bool = False,
    tables: list[str] | None = None,
    on_deleted: Callable[[str, int], None] | None = None,
) -> list[TableResult]:
    policies = await storage.retention_policies(settings.retention_days)
    results = []
    now = time.time()
    for policy in policies:
        if tables is not None and policy.table not in tables:
            continue
        cutoff = cutoff_ms(policy.retention_days, now)
        table = policy.table
        if dry_run or not policy.enabled:
            rows = await storage.count_expired(table, cutoff)
            results.append(
                TableResult(
                    table, policy.retention_days, cutoff, rows if dry_run else 0, policy.enabled
                )
            )
            continue
        deleted = await _delete_expired(settings, table, cutoff, storage.delete_expired, on_deleted)
        if deleted:
            log.info(
                "retention deleted %d rows from %s older than %d days",
                deleted,
                table,
                policy.retention_days,
            )
        results.append(TableResult(table, policy.retention_days, cutoff, deleted, True))
    if tables is None:
        results += await _rollups(storage, settings, now, dry_run, on_deleted)
        if not dry_run:
            await _forget_idempotency_keys(storage, settings)
    return results


async def _forget_idempotency_keys(storage: StorageBackend, settings: Settings) -> None:
    """Upkeep, not retention: keys past ``METRICS_IDEMPOTENCY_WINDOW_S`` are no longer looked at;
    delete them so that the table stays as small as one window of batches."""
    window = settings.idempotency_window_s
    forgotten = await _delete_expired(
        settings,
        "idempotency_keys",
        int((time.time() - window) * 1000),
        lambda _table, before, n: storage.forget_idempotency_keys(before, n),
        None,
    )
    if forgotten:
        log.info("forgot %d idempotency keys older than %g s", forgotten, window)


async def _rollups(
    storage: StorageBackend,
    settings: Settings,
    now: float,
    dry_run: bool,
    on_deleted: Callable[[str, int], None] | None,
) -> list[TableResult]:
    """Compact complete days into the day rollups, then delete rollups past their own retention."""
    if not dry_run:
        await storage.compact_rollups(int(now * 1000))
    days = settings.rollup_retention_days
    # Whole days, so that the hour and day tables always cover the same history.
    cutoff = cutoff_ms(days, now) // rollups.DAY_MS * rollups.DAY_MS
    results = []
    for table in rollups.TABLES:
        if dry_run:
            rows = await storage.count_expired(table, cutoff)
        else:
            rows = await _delete_expired(
                settings, table, cutoff, storage.delete_expired, on_deleted
            )
            if rows:
                log.info("retention deleted %d rows from %s older than %d days", rows, table, days)
        results.append(TableResult(table, days, cutoff, rows, True))
    return results


class RetentionLoop:
    """Runs retention at start-up and then every ``METRICS_RETENTION_INTERVAL_S``."""

    def __init__(
        self,
        storage: StorageBackend,
        settings: Settings,
        on_deleted: Callable[[str, int], None] | None = None,
    ) -> None:
        self._storage = storage
        self._settings = settings
        self._on_deleted = on_deleted
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.finished_runs = 0  # runs that ended, failed or not

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await run_once(self._storage, self._settings, on_deleted=self._on_deleted)
            except Exception:
                log.exception("retention run failed; trying again next interval")
            self.finished_runs += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._settings.retention_interval_s)

    async def shutdown(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
