"""Key changes pushed to every replica: ``LISTEN``/``NOTIFY`` on one dedicated connection.

A trigger on ``api_keys`` (migration 2) sends ``NOTIFY metrics_keys`` from every statement that
changes a key; PostgreSQL delivers it when that transaction commits, whichever replica or CLI
ran it. Each service process holds one connection that listens (asyncpg's ``add_listener``) and
calls ``on_change`` on every notification, so the caller reloads its key table at once.

A lost connection (the server restarted, ``pg_terminate_backend``, the network) is noticed by
the driver's termination callback or by a periodic ``SELECT 1``, and reconnected with a growing
delay; after a reconnect ``on_change`` is called once, since notifications sent while nobody
listened are gone. Meanwhile the periodic key reload (``METRICS_KEY_RELOAD_INTERVAL_S``) is what
keeps the keys fresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress

import asyncpg

from metrics_service.storage.postgres._conn import Conn
from metrics_service.storage.postgres.migrations import KEY_CHANNEL

log = logging.getLogger(__name__)

#: The listening connection's ``application_name`` (``pg_stat_activity`` shows it).
APPLICATION_NAME = "metrics-service key listener"
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


class KeyListener:
    """One listening connection, kept open by a background task until :meth:`close`."""

    def __init__(
        self,
        url: str,
        on_change: Callable[[], None],
        *,
        connect_timeout_s: float = 10.0,
        check_interval_s: float = 5.0,
        max_delay_s: float = 5.0,
    ) -> None:
        self._url = url
        self._on_change = on_change
        self._connect_timeout_s = connect_timeout_s
        self._check_interval_s = check_interval_s
        self._max_delay_s = max_delay_s
        self._task: asyncio.Task[None] | None = None
        #: Set while a connection listens; the server pid of that connection.
        self.listening = asyncio.Event()
        self.server_pid: int | None = None
        #: Connections made so far (the first one and every reconnect).
        self.connections = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="key-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    def _notified(self, conn: Conn, pid: int, channel: str, payload: object) -> None:
        self._on_change()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=self._connect_timeout_s,
                    server_settings={"application_name": APPLICATION_NAME},
                )
            except (*_ERRORS, ValueError) as exc:
                log.warning("key listener: cannot connect (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay_s)
                continue
            try:
                await self._listen(conn)
            except _ERRORS as exc:
                log.warning("key listener: connection lost (%s); reconnecting", exc)
            finally:
                self.listening.clear()
                self.server_pid = None
                if not conn.is_closed():
                    conn.terminate()
            delay = 0.05
            await asyncio.sleep(delay)

    async def _listen(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(KEY_CHANNEL, self._notified)
        self.connections += 1
        self.server_pid = conn.get_server_pid()
        self.listening.set()
        if self.connections > 1:
            # What changed while nobody listened was never delivered.
            self._on_change()
        while not lost.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._check_interval_s)
            if not lost.is_set():
                # A half-open connection never reports its loss: ask it.
                await conn.fetchval("SELECT 1", timeout=self._connect_timeout_s)
        log.warning("key listener: the connection was closed; reconnecting")
