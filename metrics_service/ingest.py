"""The write queue: group commit of accepted metrics into the database.

Requests put their validated rows on a bounded in-memory queue; one writer task takes everything
queued (up to ``METRICS_COMMIT_MAX_ROWS``) and commits it in one transaction
(``StorageBackend.insert_batches``; on SQLite, on the writer thread, the only connection that
writes). While one commit runs the next batch forms, so concurrent
requests share commits and durability costs little throughput.

- ``durable`` acknowledgement (default): ``submit`` returns once the rows are committed. A failed
  commit is rolled back whole and retried up to ``METRICS_COMMIT_RETRIES`` times; if it still
  fails, the waiting requests get 503 and nothing of theirs is stored.
- ``buffered``: ``submit`` returns at once; the writer commits every ``METRICS_FLUSH_INTERVAL_S``
  (or sooner when a full batch is waiting) and retries a failed commit, whatever the failure,
  until it succeeds or the process exits, since those rows were already acknowledged.

Either way the queue is bounded (``METRICS_QUEUE_MAX_METRICS``): full -> 503, never unbounded
memory. ``close`` stops intake and commits everything pending, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from metrics_service.errors import StorageError, Unavailable
from metrics_service.idempotency import Claim
from metrics_service.settings import AckMode, Settings
from metrics_service.validation import Batch

if TYPE_CHECKING:
    from metrics_service.storage.backend import StorageBackend

log = logging.getLogger(__name__)

#: Called on the event loop after each successful commit with the committed batches.
CommitListener = Callable[[Sequence[Batch], int, float], None]


@dataclass(slots=True)
class _Entry:
    batch: Batch
    size: int
    future: asyncio.Future[None] | None
    claim: Claim | None = None


class WriteQueue:
    def __init__(self, storage: StorageBackend, settings: Settings) -> None:
        self._storage = storage
        self._settings = settings
        self._durable = settings.ack_mode is AckMode.durable
        self._pending: deque[_Entry] = deque()
        self.pending_metrics = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        self.on_failure: Callable[[], None] = lambda: None
        self.healthy = True
        self.last_error: str | None = None
        self.committed_metrics = 0

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="write-queue")

    async def submit(self, batch: Batch, claim: Claim | None = None) -> None:
        """Queue ``batch``; in durable mode, return only when it is committed. ``claim`` (an
        idempotency key) is committed in the same transaction as the rows."""
        size = batch.accepted
        if size == 0:
            return
        if self._closing:
            raise Unavailable("the service is shutting down", headers={"Retry-After": "5"})
        if self.pending_metrics + size > self._settings.queue_max_metrics:
            retry = max(1, round(self._settings.flush_interval_s)) if not self._durable else 1
            raise Unavailable(
                "the write queue is full, retry later", headers={"Retry-After": str(retry)}
            )
        future = asyncio.get_running_loop().create_future() if self._durable else None
        self._pending.append(_Entry(batch, size, future, claim))
        if claim is not None:
            claim.submitted = True
        self.pending_metrics += size
        if self._durable or self.pending_metrics >= self._settings.commit_max_rows:
            self._wakeup.set()
        if future is not None:
            # The future is this request's own: a cancelled caller cancels only it, and the
            # entry is committed with the others all the same (``_finish`` skips a done
            # future). No ``asyncio.shield``: it cost a second future and two callbacks per
            # request, and left an exception nobody retrieved when a cancelled one failed.
            await future

    def _take(self) -> list[_Entry]:
        taken: list[_Entry] = []
        rows = 0
        limit = self._settings.commit_max_rows
        while self._pending and (not taken or rows + self._pending[0].size <= limit):
            entry = self._pending.popleft()
            taken.append(entry)
            rows += entry.size
        return taken

    async def _wait_for_work(self) -> None:
        if self._durable:
            if not self._pending:
                await self._wakeup.wait()
            linger = self._settings.commit_linger_ms / 1000
            if linger and self.pending_metrics < self._settings.commit_max_rows:
                await asyncio.sleep(linger)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._settings.flush_interval_s)
        self._wakeup.clear()

    async def _run(self) -> None:
        while True:
            if self._closing and not self._pending:
                return
            if not self._closing:
                await self._wait_for_work()
            entries = self._take()
            if entries:
                await self._commit(entries)

    async def _commit(self, entries: list[_Entry]) -> None:
        parts = [e.batch.rows for e in entries]
        claims = [e.claim for e in entries] if any(e.claim for e in entries) else []
        size = sum(e.size for e in entries)
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self._storage.insert_batches(parts, claims)
            except Exception as exc:
                # Any failure, not only the database's: in buffered mode these rows were
                # acknowledged, so they are retried until stored (or the process exits).
                attempt += 1
                self.on_failure()
                self.healthy = False
                if isinstance(exc, StorageError):
                    self.last_error = str(exc)
                    log.error("commit of %d metrics failed (attempt %d): %s", size, attempt, exc)
                else:
                    self.last_error = f"unexpected {type(exc).__name__}"
                    log.exception(
                        "commit of %d metrics failed unexpectedly (attempt %d)", size, attempt
                    )
                if self._durable and attempt > self._settings.commit_retries:
                    self._finish(
                        entries,
                        Unavailable(
                            "the metrics could not be stored, retry later",
                            headers={"Retry-After": "1"},
                        ),
                    )
                    return
                await asyncio.sleep(min(5.0, 0.05 * 2**attempt))
                continue
            except BaseException:  # cancelled at the shutdown deadline, or the process is ending
                self._finish(entries, Unavailable("the service is shutting down"))
                raise
            elapsed = time.perf_counter() - started
            if not self.healthy:
                log.info("commits succeed again")
            self.healthy = True
            self.last_error = None
            # A part whose key another process had committed stored nothing.
            stored = [e for e in entries if e.claim is None or e.claim.existing is None]
            size = sum(e.size for e in stored)
            self.committed_metrics += size
            self._finish(entries, None)
            batches = [e.batch for e in stored]
            for listener in self._listeners:
                try:
                    listener(batches, size, elapsed)
                except Exception:
                    log.exception("commit listener failed")
            return

    def _finish(self, entries: list[_Entry], error: BaseException | None) -> None:
        for entry in entries:
            self.pending_metrics -= entry.size
            if entry.claim is not None:
                entry.claim.settle(error)
            future = entry.future
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def close(self, timeout_s: float) -> int:
        """Stop intake, commit what is pending; return the number of metrics left uncommitted."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.error(
                    "shutdown deadline passed with %d metrics uncommitted", self.pending_metrics
                )
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        return self.pending_metrics
