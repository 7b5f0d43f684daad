"""Key changes pushed through PostgreSQL's LISTEN/NOTIFY (storage/postgres/listener.py), against a
real server: a key created, revoked or rotated through one backend (as the CLI or another
replica does) reaches the listening backend as a notice, and a listening connection killed with
``pg_terminate_backend`` comes back by itself and catches up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from metrics_service.storage.postgres import Backend
from metrics_service.storage.postgres.listener import APPLICATION_NAME


class Notices:
    """Counts the backend's ``on_keys_changed`` calls; awaits the next one with a deadline."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()

    async def next(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self._event.wait(), timeout_s)
        self._event.clear()


async def until(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def replica_and_cli(url: str) -> AsyncIterator[tuple[Notices, Backend, Backend]]:
    """A backend listening as a replica's does, one that does not as the CLI's, and the
    replica's notices."""
    notices = Notices()
    replica, cli = Backend(None, url), Backend(None, url)
    replica.on_keys_changed = notices
    try:
        await replica.open()
        await cli.open()
        assert replica.key_listener is not None and replica.key_listener.listening.is_set()
        yield notices, replica, cli
    finally:
        await cli.close()
        await replica.close()


async def create(backend: Backend, secret: str) -> int:
    record = await backend.create_key(
        service="svc",
        role="ingest",
        key_hash=secret * 64,
        key_prefix=secret,
        rate_limit_per_min=None,
        source="cli",
    )
    return record.id


def test_key_create_revoke_and_rotate_elsewhere_notify_the_listening_backend(
    postgres_url: str,
) -> None:
    async def go() -> None:
        async with replica_and_cli(postgres_url) as (notices, replica, cli):
            # Without a callback (the CLI) no connection listens.
            assert cli.key_listener is None
            key_id = await create(cli, "a")
            await notices.next()
            assert [k.id for k in await replica.list_keys(active_only=True)] == [key_id]
            rotated = await cli.rotate_key(key_id, key_hash="b" * 64, key_prefix="b", source="cli")
            assert rotated is not None
            await notices.next()
            await cli.revoke_key(rotated[1].id)
            await notices.next()
            assert await replica.list_keys(active_only=True) == []
            # Nothing else changed: nothing else was heard.
            assert notices.count == 3

    asyncio.run(go())


def test_a_terminated_listening_connection_reconnects_and_catches_up(postgres_url: str) -> None:
    async def go() -> None:
        async with replica_and_cli(postgres_url) as (notices, replica, other):
            listener = replica.key_listener
            assert listener is not None and listener.connections == 1
            first_pid = listener.server_pid
            names = await other.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1", first_pid
            )
            assert names == [(APPLICATION_NAME,)]
            killed = await other.execute("SELECT pg_terminate_backend($1)", first_pid)
            assert killed == [(True,)]
            # Back on a new server process; the reconnect itself reports a possible change
            # (what was sent while nobody listened is lost).
            await until(lambda: listener.connections == 2 and listener.listening.is_set())
            assert listener.server_pid not in (None, first_pid)
            await notices.next()
            assert notices.count == 1
            key_id = await create(other, "c")
            await notices.next()
            await other.revoke_key(key_id)
            await notices.next()
            assert notices.count == 3
        # Closed: no connection listens any more.
        assert listener.server_pid is None

    asyncio.run(go())
