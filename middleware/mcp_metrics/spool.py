"""The on-disk spool (``METRICS_CLIENT_SPOOL_PATH``): events survive a restart of their process.

A directory, used by one client at a time (an exclusive ``flock`` on ``lock``)::

    seg-000000000001.log    recorded events, one JSON line each, appended before record() returns
    cursor                  "<segment> <offset>": where the next batch starts
    batch-000000000007.json  a batch taken for sending: its parts, their idempotency keys, bodies

Taking a batch writes its file (atomically: a temporary file renamed) before the cursor moves
past its events, so an event is always in a segment after the cursor or in a batch file, never in
neither; a batch file is rewritten without a part once the service has answered for it, and
removed with its last part. After a crash the batch files are sent again with the same keys (the
service stores each key once) and the events after the cursor are batched as usual.

Bounded in bytes: when an event does not fit, the oldest whole segment of events not yet taken is
dropped (counted). Every method runs under the caller's lock. Nothing is fsynced: the spool
survives the process being killed, not a power cut before the OS wrote the pages back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Spool", "SpooledPart"]

logger = logging.getLogger("mcp_metrics")

_SEGMENT_MAX_BYTES = 1024 * 1024


@dataclass(eq=False)
class SpooledPart:
    """One POST body with its idempotency key and the number of events in it."""

    key: str
    body: bytes
    count: int
    batch: int = 0  # the batch file's number (0: not spooled)


@dataclass
class _Batch:
    number: int
    end: tuple[int, int]
    parts: list[SpooledPart] = field(default_factory=list)
    size: int = 0


class Spool:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(_SEGMENT_MAX_BYTES, max_bytes // 8))
        self.unbatched = 0  # events after the cursor
        self.dropped = 0  # events dropped because the spool was full
        self._bytes = 0
        self._cursor = (1, 0)
        self._write_segment = 1
        self._write_size = 0
        self._fd = -1
        self._lock_file: IO[bytes] | None = None
        self._reader: IO[bytes] | None = None
        self._reader_segment = 0
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 1

    # -- opening and recovery ---------------------------------------------------------------

    def open(self) -> list[SpooledPart]:
        """Lock the directory and recover it; return the parts of batches still unanswered.
        OSError if the directory cannot be used (another client holds it, no permission)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / "lock", "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise OSError(f"the spool {self.path} is in use by another process") from None
        self._lock_file = lock
        for tmp in self.path.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._cursor = self._read_cursor()
        parts: list[SpooledPart] = []
        for file in sorted(self.path.glob("batch-*.json")):
            batch = self._load_batch(file)
            if batch is None:
                continue
            self._batches[batch.number] = batch
            self._bytes += batch.size
            self._next_batch = max(self._next_batch, batch.number + 1)
            self._cursor = max(self._cursor, batch.end)
            parts.extend(batch.parts)
        segments = self._segments()
        for number in segments:
            if number < self._cursor[0]:
                self._segment(number).unlink(missing_ok=True)  # taken before the crash
        live = [n for n in segments if n >= self._cursor[0]]
        if live and self._cursor[0] not in live:
            self._cursor = (live[0], 0)
        for number in live:
            start = self._cursor[1] if number == self._cursor[0] else 0
            data = self._segment(number).read_bytes()[start:]
            self.unbatched += data.count(b"\n")
            self._bytes += len(data)
        # Always append to a new segment: one cut short by a crash ends in a partial line.
        self._write_segment = max([self._cursor[0], *live]) + 1 if live else self._cursor[0]
        if not live:
            self._cursor = (self._write_segment, 0)
        self._open_segment(self._write_segment)
        self._write_cursor()
        return parts

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def _segments(self) -> list[int]:
        numbers = []
        for file in self.path.glob("seg-*.log"):
            with contextlib.suppress(ValueError):
                numbers.append(int(file.stem[4:]))
        return sorted(numbers)

    def _segment(self, number: int) -> Path:
        return self.path / f"seg-{number:012d}.log"

    def _read_cursor(self) -> tuple[int, int]:
        try:
            seg, off = (self.path / "cursor").read_text().split()
            return int(seg), int(off)
        except (FileNotFoundError, ValueError):
            return (1, 0)

    def _write_cursor(self) -> None:
        self._replace(self.path / "cursor", f"{self._cursor[0]} {self._cursor[1]}\n".encode())

    def _replace(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self._segment(number)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._write_segment = number
        self._write_size = os.fstat(self._fd).st_size

    # -- recording ------------------------------------------------------------------------

    def append(self, line: bytes) -> bool:
        """Append one event (a JSON line ending in a newline); False when it cannot fit at all.
        Makes room by dropping the oldest events not yet taken (``dropped`` counts them)."""
        if self.closed:
            return False
        size = len(line)
        while self._bytes + size > self.max_bytes and self._drop_oldest_segment():
            pass
        if self._bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        if self._write_size + size > self.segment_bytes and self._write_size > 0:
            self._open_segment(self._write_segment + 1)
        os.write(self._fd, line)
        self._write_size += size
        self._bytes += size
        self.unbatched += 1
        return True

    def _drop_oldest_segment(self) -> bool:
        seg, off = self._cursor
        if seg == self._write_segment:
            if self._write_size <= off:
                return False  # nothing untaken to drop
            self._open_segment(self._write_segment + 1)
        data = self._segment(seg).read_bytes()[off:]
        lost = data.count(b"\n")
        self._cursor = (seg + 1, 0)
        self._write_cursor()
        self._segment(seg).unlink(missing_ok=True)
        self._bytes -= len(data)
        self.unbatched -= lost
        self.dropped += lost
        return True

    # -- sending ---------------------------------------------------------------------------

    def peek(self, limit: int) -> tuple[list[bytes], tuple[int, int]]:
        """Up to ``limit`` events after the cursor, and the position after them."""
        seg, off = self._cursor
        if self.closed:
            return [], (seg, off)
        lines: list[bytes] = []
        while len(lines) < limit:
            reader = self._read_segment(seg)
            if reader is None:
                break
            reader.seek(off)
            while len(lines) < limit:
                line = reader.readline()
                if not line.endswith(b"\n"):
                    break  # the end, or a line cut short by a crash
                lines.append(line)
                off += len(line)
            if len(lines) >= limit or seg >= self._write_segment:
                break
            seg, off = seg + 1, 0
        return lines, (seg, off)

    def _read_segment(self, number: int) -> IO[bytes] | None:
        if self._reader is None or self._reader_segment != number:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            try:
                self._reader = open(self._segment(number), "rb")  # noqa: SIM115
            except FileNotFoundError:
                return None
            self._reader_segment = number
        return self._reader

    def take(self, parts: list[SpooledPart], taken: int, end: tuple[int, int]) -> None:
        """Record ``parts`` (built from ``taken`` events up to ``end``) as a batch file, then
        move the cursor past those events."""
        if self.closed:
            raise OSError("the spool is closed")
        if not parts:  # every event was left out (too large): only move the cursor
            self._bytes -= self._consumed_bytes(end)
            self._cursor = end
            self._write_cursor()
            self.unbatched -= taken
            return
        number = self._next_batch
        self._next_batch += 1
        header = {
            "end": list(end),
            "parts": [{"key": p.key, "count": p.count, "len": len(p.body)} for p in parts],
        }
        data = json.dumps(header).encode() + b"\n" + b"".join(p.body for p in parts)
        self._replace(self._batch_path(number), data)
        for part in parts:
            part.batch = number
        before = self._consumed_bytes(end)
        self._cursor = end
        self._write_cursor()
        for seg in range(self._first_segment_before(end), end[0]):
            self._segment(seg).unlink(missing_ok=True)
        self._batches[number] = _Batch(number, end, list(parts), len(data))
        self._bytes += len(data) - before
        self.unbatched -= taken

    def _first_segment_before(self, end: tuple[int, int]) -> int:
        segments = [n for n in self._segments() if n < end[0]]
        return segments[0] if segments else end[0]

    def _consumed_bytes(self, end: tuple[int, int]) -> int:
        """Bytes of the events between the cursor and ``end``."""
        seg, off = self._cursor
        total = 0
        while (seg, off) < end:
            if seg == end[0]:
                total += end[1] - off
                break
            with contextlib.suppress(FileNotFoundError):
                total += self._segment(seg).stat().st_size - off
            seg, off = seg + 1, 0
        return total

    def _batch_path(self, number: int) -> Path:
        return self.path / f"batch-{number:012d}.json"

    def done(self, part: SpooledPart) -> None:
        """The service answered for ``part``: forget it."""
        if self.closed:
            return  # a sender outliving close(): the next client sends it again (same key)
        batch = self._batches.get(part.batch)
        if batch is None:
            return
        batch.parts = [p for p in batch.parts if p is not part]
        self._bytes -= batch.size
        path = self._batch_path(batch.number)
        if not batch.parts:
            path.unlink(missing_ok=True)
            del self._batches[batch.number]
            return
        header = {
            "end": list(batch.end),
            "parts": [{"key": p.key, "count": p.count, "len": len(p.body)} for p in batch.parts],
        }
        data = json.dumps(header).encode() + b"\n" + b"".join(p.body for p in batch.parts)
        self._replace(path, data)
        batch.size = len(data)
        self._bytes += batch.size

    def _load_batch(self, file: Path) -> _Batch | None:
        try:
            number = int(file.stem[6:])
            raw = file.read_bytes()
            head, _, rest = raw.partition(b"\n")
            header = json.loads(head)
            end = (int(header["end"][0]), int(header["end"][1]))
            parts = []
            at = 0
            for p in header["parts"]:
                body = rest[at : at + int(p["len"])]
                at += int(p["len"])
                parts.append(SpooledPart(str(p["key"]), body, int(p["count"]), number))
            if at != len(rest):
                raise ValueError("the bodies do not match the header")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            logger.error("metrics spool: unreadable batch file %s (%s); set aside", file, exc)
            with contextlib.suppress(OSError):
                file.rename(file.with_suffix(".corrupt"))
            return None
        return _Batch(number, end, parts, len(raw))

    @property
    def closed(self) -> bool:
        return self._lock_file is None

    @property
    def size_bytes(self) -> int:
        return self._bytes
