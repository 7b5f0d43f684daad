"""Incremental framers for the two MCP wire formats the proxy observes.

`LineFramer` splits the stdio stream (newline-delimited JSON-RPC, one message or one batch per
line) however the reads cut it; `SseFramer` splits a `text/event-stream` body into events. Both
only look at copies of the bytes the relay has already forwarded, keep at most `max_frame_bytes`
of a frame they are still waiting for, and report a longer frame by its size alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "Frame", "LineFramer", "SseEvent", "SseFramer", "decode"]

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Frame:
    """One complete line: its bytes (None when it was too long to keep) and its wire size."""

    data: bytes | None
    size: int


class LineFramer:
    """Feed it chunks as they are read; it returns the lines they complete.

    ```python
    framer = LineFramer()
    framer.feed(b'{"jsonrpc":"2.0","id":1,')  # []
    framer.feed(b'"method":"ping"}\\n')        # [Frame(b'{"jsonrpc": ...}', 38)]
    ```

    A `\\r` before the newline and blank lines are dropped (the size still counts the whole line).
    `desync()` forgets the partial line after the observer skipped bytes, so that the next
    newline starts over instead of gluing two halves together.
    """

    __slots__ = ("_discarding", "_max", "_parts", "_pending")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._max = max_frame_bytes
        self._parts: list[bytes] = []
        self._pending = 0  # bytes of the current partial line, kept or not
        self._discarding = False  # the current line outgrew the limit: count, do not keep

    def feed(self, chunk: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        end = len(chunk)
        while start < end:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                self._hold(chunk[start:] if start else chunk)
                break
            size = self._pending + nl - start + 1
            if self._discarding:
                frames.append(Frame(None, size))
            else:
                piece = chunk[start:nl]
                data = b"".join((*self._parts, piece)) if self._parts else piece
                if data.endswith(b"\r"):
                    data = data[:-1]
                if data.strip():
                    frames.append(Frame(data, size))
            self._parts = []
            self._pending = 0
            self._discarding = False
            start = nl + 1
        return frames

    def _hold(self, rest: bytes) -> None:
        self._pending += len(rest)
        if self._discarding:
            return
        if self._pending > self._max:
            self._parts = []
            self._discarding = True
        else:
            self._parts.append(rest)

    def desync(self) -> None:
        self._parts = []
        self._discarding = True  # the rest of the current line is not a frame start

    @property
    def pending_bytes(self) -> int:
        return self._pending


@dataclass(frozen=True)
class SseEvent:
    """One dispatched server-sent event; `data` is None when it was too long to keep."""

    event: str
    data: str | None
    size: int
    id: str | None = None


class SseFramer:
    """Incremental `text/event-stream` parser (the WHATWG HTML "event stream" rules).

    Lines end in CRLF, LF or CR; `data:` lines join with newlines; a blank line dispatches; lines
    starting with `:` are comments. Events without data are not dispatched.
    """

    __slots__ = ("_buf", "_cr", "_data", "_event", "_id", "_max", "_over", "_size")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = b""
        self._cr = False  # the last chunk ended in CR: a following LF belongs to it
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._size = 0
        self._over = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if not chunk:
            return []
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        buf = self._buf + chunk if self._buf else chunk
        events: list[SseEvent] = []
        lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > self._max:  # one line longer than the limit: keep counting only
            self._size += len(self._buf)
            self._buf = b""
            self._over = True
        for line in lines:
            self._line(line, events)
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        self._size += len(line) + 1
        if not line:
            if self._data or self._over:
                data = None if self._over else "\n".join(self._data)
                events.append(SseEvent(self._event or "message", data, self._size, self._id))
            self._event = ""
            self._data = []
            self._size = 0
            self._over = False
            return
        if line.startswith(b":"):
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        field = name.decode("utf-8", "replace")
        text = value.decode("utf-8", "replace")
        if field == "data":
            if not self._over:
                self._data.append(text)
                if self._size > self._max:
                    self._data = []
                    self._over = True
        elif field == "event":
            self._event = text
        elif field == "id" and "\0" not in text:
            self._id = text


def decode(data: bytes | str | None) -> list[dict[str, Any]]:
    """The JSON-RPC messages of one frame: a message, or the messages of a batch; [] if neither."""
    if data is None:
        return []
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    if type(parsed) is dict:
        return [parsed]
    if type(parsed) is list:
        return [m for m in parsed if type(m) is dict]
    return []
