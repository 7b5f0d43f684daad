"""The body deadline of the ingest endpoints: one timer per event loop for every read, a
shorter deadline not held back by a longer one, and a cancellation from elsewhere kept as it is
(not turned into a 408)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from metrics_service import api
from metrics_service.errors import RequestTimeout


def _receive_after(event: asyncio.Event, body: bytes = b"{}") -> Any:
    async def receive() -> dict[str, Any]:
        await event.wait()
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def test_a_short_deadline_fires_while_a_longer_one_waits_and_outside_cancels_stay() -> None:
    async def scenario() -> None:
        never, soon = asyncio.Event(), asyncio.Event()
        slow = asyncio.create_task(api.read_body(_receive_after(never), None, 100, 30.0))
        await asyncio.sleep(0)
        quick = asyncio.create_task(api.read_body(_receive_after(never), None, 100, 0.05))
        with pytest.raises(RequestTimeout):
            await quick
        assert not slow.done()
        slow.cancel()  # e.g. the server shutting down: a cancellation, not a timeout
        with pytest.raises(asyncio.CancelledError):
            await slow
        # A body that arrives in time is returned, and nothing of the read is left behind.
        read = asyncio.create_task(api.read_body(_receive_after(soon, b"ok"), None, 100, 30.0))
        await asyncio.sleep(0)
        soon.set()
        assert await read == b"ok"
        deadlines = api._deadlines()
        assert deadlines._due == {} and deadlines.expired == set()

    asyncio.run(scenario())


def test_each_event_loop_has_its_own_deadlines() -> None:
    async def one() -> Any:
        return api._deadlines()

    first, second = asyncio.run(one()), asyncio.run(one())
    assert first is not second
