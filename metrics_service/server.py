"""The HTTP server's process: uvicorn's connection protocol with a deadline on receiving a request
head, and the garbage collector's settings for a long-running ingest process.

uvicorn times out idle keep-alive connections only after a response, and any byte received
cancels that timer; a connection that never completes its request line and headers (a client
that connects and says nothing, or trickles a header a byte at a time: slowloris) is held open
for ever. ``deadline_protocol(timeout_s)`` closes a connection whose next request head has not
fully arrived ``timeout_s`` after the connection opened or after the previous response. The
body has its own deadline in ``api.read_body`` (408), so a whole request is bounded.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def deadline_protocol(
    timeout_s: float, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol (httptools or h11) enforcing the head deadline."""

    class DeadlineProtocol(base):  # type: ignore[valid-type,misc]
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: Any = None
        _head_due = 0.0

        def _arm(self) -> None:
            # The request cycle is replaced when a new request head has been parsed; if it is
            # still the same one at the deadline, no request arrived in time. One timer per
            # connection, moved lazily: re-arming after each response only notes the new
            # deadline, and a timer that fires early waits for the rest (cancelling and
            # scheduling a timer per request cost about 3 us of each one at batch 1).
            self._head_due = self.loop.time() + timeout_s
            self._head_cycle = self.cycle
            if self._head_timer is None:
                self._head_timer = self.loop.call_at(self._head_due, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.loop.time() < self._head_due:
                self._head_timer = self.loop.call_at(self._head_due, self._head_deadline)
                return
            cycle = self._head_cycle
            # Still the same cycle, and it is not a request being served (pipelined ones too).
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return DeadlineProtocol


#: Container allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Freeze what start-up allocated and collect the young generation less often.

    Ingest allocates a few container objects per metric (structs, row tuples) that die with their
    request and are freed by reference counting; the cycle collector finds nothing in them but
    ran about every 7 metrics, and each full collection walked every object of the imported
    modules. ``bench/breakdown.py`` measured 0.6 us of collection per metric at batch 100 with
    the defaults, 0.02 us with these. Cyclic garbage is still collected, in larger steps.
    """
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, gen1, gen2)
