"""The two senders: `MetricsClient` (an asyncio task) and `ThreadedMetricsClient` (a thread).

Both drain the `Recorder` queue in batches of `max_batch_size`, at least every
`flush_interval_s`, and flush on close within `shutdown_timeout_s`. The loop itself is
`Recorder._sender`, shared: each client only carries its steps out (wait, POST, sleep).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
import weakref
from typing import Any

import httpx

from .config import ClientConfig
from .recorder import _BACKOFF, _POST, _WAIT, IDEMPOTENCY_HEADER, Recorder, _Step

__all__ = ["MetricsClient", "ThreadedMetricsClient"]

logger = logging.getLogger("mcp_metrics")


class MetricsClient(Recorder):
    """Async metrics client: the sender is an asyncio task on the running loop.

    ```python
    from mcp_metrics import MetricsClient

    metrics = MetricsClient(service="registry")  # url/api_key from METRICS_SERVICE_URL/_API_KEY

    async def main():
        async with metrics:                      # starts the sender, flushes on exit
            metrics.record_custom("cache_miss", region="eu")
    ```

    `record*()` may be called before `start()`: the sender starts itself on the first event
    recorded inside a running loop. `aclose()` flushes within `shutdown_timeout_s`.
    """

    def __init__(self, config: ClientConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._event: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None

    async def __aenter__(self) -> MetricsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the sender on the running loop (idempotent)."""
        self._ensure_sender(asyncio.get_running_loop())

    def _enqueue(self, event: dict[str, Any]) -> None:
        loop = asyncio._get_running_loop()
        if loop is not None and loop is not self._loop:
            self._ensure_sender(loop)
        super()._enqueue(event)

    def _ensure_sender(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._active or self._closing:
            return
        old = self._loop
        if old is loop and self._task is not None and not self._task.done():
            return
        if old is not None and old is not loop and old.is_running() and not old.is_closed():
            return  # the sender lives on another live loop; it will pick the events up
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._event = asyncio.Event()
        self._idle = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = loop.create_task(self._run(), name="mcp-metrics-sender")

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is None or event is None:
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(event.set)

    async def _wait(self, timeout: float) -> bool:
        """Wait for a wake-up (True) or the timeout (False)."""
        event = self._event
        assert event is not None
        try:
            await asyncio.wait_for(event.wait(), timeout)
            woke = True
        except asyncio.TimeoutError:
            woke = False
        event.clear()
        return woke

    async def _backoff(self, delay: float) -> None:
        # Waits out the delay even when the queue fills up meanwhile; only close() cuts it short.
        stop = self._stop
        assert stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    def _set_idle(self, idle: bool) -> None:
        if self._idle is not None:
            if idle:
                self._idle.set()
            else:
                self._idle.clear()

    async def _run(self) -> None:
        cfg = self.config
        async with httpx.AsyncClient(timeout=cfg.timeout_s, headers=self._headers) as http:
            steps = self._sender()
            outcome: object = None
            try:
                while True:
                    try:
                        step = steps.send(outcome)
                    except StopIteration:
                        return
                    outcome = await self._carry_out(step, http)
            finally:
                steps.close()

    async def _carry_out(self, step: _Step, http: httpx.AsyncClient) -> object:
        if step.kind == _POST:
            assert step.part is not None
            try:
                return await http.post(
                    self.config.endpoint,
                    content=step.part.body,
                    headers={IDEMPOTENCY_HEADER: step.part.key},
                )
            except Exception as exc:  # the loop decides; CancelledError is not caught
                return exc
        if step.kind == _WAIT:
            return await self._wait(step.seconds)
        if step.kind == _BACKOFF:
            await self._backoff(step.seconds)
        else:
            await asyncio.sleep(step.seconds)
        return None

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been handled; False on timeout."""
        if not self._active:
            return True
        loop = asyncio.get_running_loop()
        self._ensure_sender(loop)
        if self._loop is not loop or self._idle is None:
            return False
        deadline = time.monotonic() + (
            self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        )
        self._drain = True
        self._idle.clear()
        self._wake()
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return False
            if not self._backlog():
                return True
            self._drain = True
            self._idle.clear()
            self._wake()
        return False

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Flush what is queued within the deadline, then stop. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + timeout
        try:
            loop = asyncio.get_running_loop()
            if self._active and self._backlog():
                # No sender, or one stranded on a loop that has stopped: flush from this loop.
                self._closing = False
                self._ensure_sender(loop)
                self._closing = True
            task = self._task
            if task is not None and not task.done():
                if self._loop is loop:
                    assert self._stop is not None
                    self._stop.set()
                    self._wake()
                    try:
                        await asyncio.wait_for(asyncio.shield(task), timeout)
                    except asyncio.TimeoutError:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                else:
                    # The sender lives on another running loop: stop it there.
                    old = self._loop
                    if old is not None and self._stop is not None:
                        old.call_soon_threadsafe(self._stop.set)
                        old.call_soon_threadsafe(task.cancel)
        except Exception:
            logger.debug("error while closing the metrics client", exc_info=True)
        self._drop_remaining()


class ThreadedMetricsClient(Recorder):
    """Metrics client for synchronous code: the sender runs on a daemon thread.

    ```python
    from mcp_metrics import ThreadedMetricsClient

    metrics = ThreadedMetricsClient(service="auth-server")
    metrics.record_auth(success=True, method="jwt", server="auth", duration_ms=12.5)
    metrics.close()  # also registered with atexit
    ```
    """

    def __init__(
        self, config: ClientConfig | None = None, *, register_atexit: bool = True, **options: Any
    ) -> None:
        super().__init__(config, **options)
        self._event = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        if register_atexit and self._active:
            ref = weakref.ref(self)

            def _close_at_exit() -> None:
                client = ref()
                if client is not None:
                    client.close()

            atexit.register(_close_at_exit)
        if self._active and self._backlog():
            self.start()  # events left in the spool by an earlier process

    def __enter__(self) -> ThreadedMetricsClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if not self._active or self._closing or self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mcp-metrics-sender", daemon=True
                )
                self._thread.start()

    def _enqueue(self, event: dict[str, Any]) -> None:
        if self._thread is None:
            self.start()
        super()._enqueue(event)

    def _wake(self) -> None:
        self._event.set()

    def _wait(self, timeout: float) -> bool:
        woke = self._event.wait(timeout)
        self._event.clear()
        return woke

    def _set_idle(self, idle: bool) -> None:
        if idle:
            self._idle.set()
        else:
            self._idle.clear()

    def _run(self) -> None:
        cfg = self.config
        with httpx.Client(timeout=cfg.timeout_s, headers=self._headers) as http:
            steps = self._sender()
            outcome: object = None
            try:
                while True:
                    try:
                        step = steps.send(outcome)
                    except StopIteration:
                        return
                    outcome = self._carry_out(step, http)
            finally:
                steps.close()

    def _carry_out(self, step: _Step, http: httpx.Client) -> object:
        if step.kind == _POST:
            assert step.part is not None
            try:
                return http.post(
                    self.config.endpoint,
                    content=step.part.body,
                    headers={IDEMPOTENCY_HEADER: step.part.key},
                )
            except Exception as exc:  # the loop decides
                return exc
        if step.kind == _WAIT:
            return self._wait(step.seconds)
        if step.kind == _BACKOFF:
            self._stop.wait(step.seconds)  # only close() cuts the backoff short
        else:
            time.sleep(step.seconds)
        return None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Block until everything queued so far has been handled; False on timeout."""
        if not self._active:
            return True
        self.start()
        deadline = time.monotonic() + (
            self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        )
        while time.monotonic() < deadline:
            self._drain = True
            self._idle.clear()
            self._wake()
            if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                return False
            if not self._backlog():
                return True
        return False

    def close(self, timeout_s: float | None = None) -> None:
        """Flush what is queued within the deadline, then stop. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + timeout
        try:
            if self._thread is None and self._backlog():
                self._closing = False
                self.start()
                self._closing = True
            if self._thread is not None:
                self._stop.set()
                self._wake()
                self._thread.join(timeout)
        except Exception:
            logger.debug("error while closing the metrics client", exc_info=True)
        self._drop_remaining()
