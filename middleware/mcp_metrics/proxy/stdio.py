"""`mcp-metrics wrap`: run an stdio MCP server as a child and meter the stream between.

Two relay threads copy bytes as they come: ours stdin -> the child's stdin, and the child's
stdout -> ours, each chunk written before anything looks at it. A copy of every chunk, stamped
with the time it was read, goes onto a queue; one observer thread frames, pairs and records from
it. The relay never waits for the observer: when the observer falls behind by more than
`max_backlog_bytes`, chunks are not copied (the relay goes on, counted and logged once) and the
observer picks up at the next frame boundary. The child's stderr is its own (inherited), its exit
status is ours, and the signals a terminal or a desktop client sends are passed on to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from .frames import LineFramer
from .observer import CLIENT_TO_SERVER, SERVER_TO_CLIENT, Observer

__all__ = ["StdioWrapper"]

logger = logging.getLogger("mcp_metrics")

READ_SIZE = 65536
DEFAULT_MAX_BACKLOG_BYTES = 64 * 1024 * 1024
FORWARDED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
)
_DRAIN_AFTER_EXIT_S = 2.0  # how long a grandchild holding the child's stdout may keep it open


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class StdioWrapper:
    """Run `argv` with its stdio relayed through this process and observed.

    ```python
    wrapper = StdioWrapper(["npx", "@modelcontextprotocol/server-everything"], observer)
    exit_status = wrapper.run()   # a negative number: the child died of that signal
    ```
    """

    def __init__(
        self,
        argv: Sequence[str],
        observer: Observer,
        *,
        stdin_fd: int = 0,
        stdout_fd: int = 1,
        max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
    ) -> None:
        self.argv = list(argv)
        self.observer = observer
        self.session = observer.session(transport="stdio")
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._max_backlog = max_backlog_bytes
        # (direction, read at, chunk or None for "chunks were skipped here"); None ends it.
        self._queue: queue.SimpleQueue[tuple[str, float, bytes | None] | None] = queue.SimpleQueue()
        self._backlog = 0
        self._lock = threading.Lock()
        self._gap = {CLIENT_TO_SERVER: False, SERVER_TO_CLIENT: False}
        self.skipped_bytes = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Start the child, relay until it exits and its output is drained; its return code."""
        try:
            # Its own process group: a terminal's Ctrl-C reaches the child once, through us.
            group: dict[str, Any] = (
                {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
            )
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **group
            )
        except OSError as exc:
            raise FileNotFoundError(f"cannot start {self.argv[0]!r}: {exc.strerror}") from exc
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        child_in, child_out = proc.stdin.fileno(), proc.stdout.fileno()
        previous = self._forward_signals(proc)
        observer = threading.Thread(target=self._observe, name="mcp-wrap-observer", daemon=True)
        observer.start()
        inbound = threading.Thread(
            target=self._relay,
            args=(self._stdin_fd, child_in, CLIENT_TO_SERVER, proc.stdin.close),
            name="mcp-wrap-stdin",
            daemon=True,  # may sit in read(0) after the child is gone; must not hold up exit
        )
        outbound = threading.Thread(
            target=self._relay,
            args=(child_out, self._stdout_fd, SERVER_TO_CLIENT, None),
            name="mcp-wrap-stdout",
            daemon=True,
        )
        inbound.start()
        outbound.start()
        try:
            status = proc.wait()
            outbound.join(_DRAIN_AFTER_EXIT_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self._queue.put(None)
        observer.join()
        if not outbound.is_alive():  # still reading: closing under it could reuse its fd
            proc.stdout.close()
        return status

    # -- relay (the hot path) -------------------------------------------------------------

    def _relay(self, src: int, dst: int, direction: str, on_eof: Callable[[], None] | None) -> None:
        sink_open = True
        while True:
            try:
                chunk = os.read(src, READ_SIZE)
            except OSError:
                chunk = b""
            if not chunk:
                break
            at = time.perf_counter()
            # Queued for the observer before it is delivered: the answer to a request can only
            # be read after the request was delivered, so it always queues after the request.
            # (Queued after delivery, a fast answer could overtake its request on the queue,
            # and the observer would count an answered call as unanswered.)
            self._copy(direction, at, chunk)
            if sink_open:
                try:
                    _write_all(dst, chunk)
                except OSError:
                    # The reader is gone (EPIPE). Keep draining the source so that the other
                    # side never blocks on a full pipe; there is nobody to deliver to.
                    sink_open = False
        if on_eof is not None:
            with contextlib.suppress(OSError):
                on_eof()

    def _copy(self, direction: str, at: float, chunk: bytes) -> None:
        size = len(chunk)
        with self._lock:
            if self._backlog + size > self._max_backlog:
                self.skipped_bytes += size
                first = not any(self._gap.values()) and self.skipped_bytes == size
                self._gap[direction] = True
                if first:
                    logger.warning(
                        "mcp-metrics wrap: the observer fell behind; not metering %d bytes"
                        " (the stream itself is unaffected)",
                        size,
                    )
                return
            self._backlog += size
            gap = self._gap[direction]
            self._gap[direction] = False
        if gap:
            self._queue.put((direction, at, None))
        self._queue.put((direction, at, chunk))

    # -- observer thread ------------------------------------------------------------------

    def _observe(self) -> None:
        framers = {CLIENT_TO_SERVER: LineFramer(), SERVER_TO_CLIENT: LineFramer()}
        session = self.session
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                break
            direction, at, chunk = item
            framer = framers[direction]
            if chunk is None:
                framer.desync()
                continue
            with self._lock:
                self._backlog -= len(chunk)
            for frame in framer.feed(chunk):
                if frame.data is not None:
                    session.frame(direction, frame.data, frame.size, at)
        session.close(time.perf_counter())

    # -- signals --------------------------------------------------------------------------

    def _forward_signals(self, proc: subprocess.Popen[bytes]) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous

        def forward(signum: int, frame: FrameType | None) -> None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

        for signum in FORWARDED_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, forward)
            except (OSError, ValueError):
                continue
        return previous


def exit_like(status: int) -> None:
    """Leave the way the child left: its exit code, or death by its signal."""
    sys.stdout.flush()
    if status >= 0:
        raise SystemExit(status)
    signum = -status
    with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # the signal did not end us (e.g. SIGWINCH is ignored)
