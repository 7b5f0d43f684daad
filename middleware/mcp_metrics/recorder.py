"""The recording side of the client and its delivery policy, shared by both senders.

Recording appends a dict to a bounded deque and returns; it never blocks and never raises. When
the queue is full the oldest event is dropped and counted. With a spool (`spool.py`) recording
appends the event to disk instead. The sender loop (`Recorder._sender`) is written once, as a
generator of steps that `MetricsClient` (asyncio) and `ThreadedMetricsClient` (a thread) carry
out. Every POST carries an `Idempotency-Key` kept across its retries, so a lost response never
stores a batch twice (docs/delivery.md). 200 counts accepted/rejected; connection errors, 5xx,
429 and 503 are retried with exponential backoff and full jitter (never sooner than
Retry-After); any other 4xx drops the batch, counted and logged once. An event with a NaN or
infinite value is dropped alone, counted and logged once.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from . import events as _ev
from .config import MAX_BODY_BYTES, ClientConfig
from .spool import Spool, SpooledPart

__all__ = ["ClientStats", "Recorder"]

logger = logging.getLogger("mcp_metrics")

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 600.0  # a Retry-After beyond this is treated as this
_USER_AGENT = "mcp-metrics-client/0.1"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode
# NaN and infinities are not JSON: refuse them (ValueError) rather than write them.
_encode_event = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode

# What the sender loop waits for; see `Recorder._sender`.
_WAIT = "wait"  # a wake-up or the timeout -> True if woken
_POST = "post"  # POST the part -> the httpx.Response, or the exception
_SLEEP = "sleep"  # the delay, whatever happens
_BACKOFF = "backoff"  # the delay, unless close() cuts it short


class _Step(NamedTuple):
    kind: str
    seconds: float
    part: SpooledPart | None = None


def backoff_delay(
    attempt: int,
    base_s: float,
    max_s: float,
    retry_after_s: float = 0.0,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """The wait before retry number ``attempt + 1``: full jitter over
    ``[base/2, min(max, base * 2**attempt)]``, or the server's Retry-After (plus up to a tenth,
    at most 1 s, of jitter) when it gave one."""
    if retry_after_s > 0:
        return retry_after_s + uniform(0, min(1.0, retry_after_s / 10))
    cap = min(max_s, base_s * (2 ** min(attempt, 30)))
    return uniform(base_s / 2, max(cap, base_s / 2))


@dataclass(frozen=True)
class ClientStats:
    """Counters since the client was built. Every recorded (or, with a spool, recovered) event
    ends in exactly one of sent, rejected, dropped_* or is still queued/in flight.

    dropped_overflow: the oldest events, dropped when the queue (or the spool) was full;
    dropped_invalid: events with a NaN or infinite value; recovered: events found in the spool
    at start, left by an earlier process."""

    recorded: int
    sent: int
    rejected: int
    dropped_overflow: int
    dropped_refused: int
    dropped_shutdown: int
    dropped_invalid: int
    recovered: int
    queued: int
    in_flight: int
    retries: int
    batches_sent: int
    last_error: str | None


class _Delivery:
    """What to do with a batch after one attempt."""

    __slots__ = ("retry_after_s",)

    def __init__(self, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s


_DONE = _Delivery(None)


def _parse_retry_after(raw: str | None) -> float | None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110, section 10.2.3)."""
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


class Recorder:
    """Queue, counters, batching and the response policy; `MetricsClient` and
    `ThreadedMetricsClient` add a sender. Type hints that take "a metrics client" use this."""

    def __init__(self, config: ClientConfig | None = None, **options: Any) -> None:
        self.config = config if config is not None else ClientConfig.from_env(**options)
        cfg = self.config
        self._queue: deque[dict[str, Any]] = deque()
        self._maxlen = cfg.max_queue_size
        self._batch_size = cfg.max_batch_size
        self._lock = threading.Lock()
        self._drain = False  # also send partial batches: set when the interval passes, by flush()
        self._attempt = 0
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._logged: set[str] = set()
        self._headers = {
            "X-API-Key": cfg.api_key or "",
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
        }
        self._envelope_head = {"service": cfg.service, "version": cfg.version}
        if cfg.instance_id:
            self._envelope_head["instance_id"] = cfg.instance_id
        self._envelope_prefix = (_encode_json(self._envelope_head)[:-1] + ',"metrics":[').encode()
        self._random: Callable[[float, float], float] = random.uniform
        self._pending: list[SpooledPart] = []
        self._active = cfg.active
        # counters
        self._recorded = 0
        self._sent = 0
        self._rejected = 0
        self._dropped_overflow = 0
        self._dropped_refused = 0
        self._dropped_shutdown = 0
        self._dropped_invalid = 0
        self._recovered = 0
        self._retries = 0
        self._batches_sent = 0
        self._last_error: str | None = None
        if not self._active and cfg.enabled:
            self._log_once(
                "inactive",
                logging.WARNING,
                "metrics reporting is off: set METRICS_SERVICE_URL and METRICS_API_KEY "
                "(or pass url= and api_key=) to enable it",
            )
        self._spool: Spool | None = None
        if self._active and cfg.spool_path:
            self._open_spool(cfg.spool_path, cfg.spool_max_bytes)

    def _open_spool(self, path: str, max_bytes: int) -> None:
        spool = Spool(path, max_bytes)
        try:
            parts = spool.open()
        except OSError as exc:
            spool.close()
            logger.error("metrics spool unusable (%s); keeping events in memory only", exc)
            return
        self._spool = spool
        self._pending = parts
        self._recovered = spool.unbatched + sum(p.count for p in parts)
        if self._recovered:
            logger.info("metrics spool %s: %d events from an earlier run", path, self._recovered)

    # -- recording (hot path) -------------------------------------------------------------

    @property
    def service(self) -> str:
        return self.config.service

    @property
    def enabled(self) -> bool:
        return self._active and not self._closing

    def record(
        self,
        type: str,
        *,
        value: float = 1.0,
        duration_ms: float | None = None,
        dimensions: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Queue one event. Never blocks, never raises; a no-op when reporting is off."""
        if not self._active or self._closing:
            return
        try:
            event: dict[str, Any] = {
                "type": type,
                "value": value,
                "timestamp": time.time() if timestamp is None else timestamp,
                "dimensions": _ev.clean_dimensions(dimensions) if dimensions else {},
            }
            if duration_ms is not None:
                event["duration_ms"] = duration_ms if duration_ms > 0 else 0.0
            if metadata:
                cleaned = _ev.clean_metadata(metadata)
                if cleaned:
                    event["metadata"] = cleaned
            self._enqueue(event)
        except Exception:  # never into the host
            logger.debug("failed to record a metric", exc_info=True)

    def _enqueue(self, event: dict[str, Any]) -> None:
        if self._spool is not None:
            self._spool_event(event)
            return
        with self._lock:
            self._recorded += 1
            if len(self._queue) >= self._maxlen:
                self._queue.popleft()
                self._dropped_overflow += 1
                overflow = True
            else:
                overflow = False
            self._queue.append(event)
            full = len(self._queue) >= self._batch_size
        if overflow:
            self._log_once(
                "overflow",
                logging.WARNING,
                "metrics queue full (%d events): dropping the oldest; the service is down or slow",
                self._maxlen,
            )
        if full:
            self._wake()

    def _spool_event(self, event: dict[str, Any]) -> None:
        line = self._event_line(event)
        with self._lock:
            self._recorded += 1
            if line is None:
                return
            spool = self._spool
            assert spool is not None
            dropped = spool.dropped
            try:
                spool.append(line + b"\n")
            except OSError as exc:  # disk full, directory gone: count it, never raise
                spool.dropped += 1
                self._log_once("spool-error", logging.ERROR, "metrics spool write failed: %s", exc)
            overflow = spool.dropped - dropped
            self._dropped_overflow += overflow
            full = spool.unbatched >= self._batch_size
        if overflow:
            self._log_once(
                "spool-full",
                logging.WARNING,
                "metrics spool full (%d bytes): dropping the oldest events",
                spool.max_bytes,
            )
        if full:
            self._wake()

    def record_auth(
        self,
        *,
        success: bool,
        method: str,
        server: str | None = None,
        user_hash: str | None = None,
        duration_ms: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        **dimensions: Any,
    ) -> None:
        """An `auth_request` event. `user_hash` must already be hashed (see `hash_value`)."""
        dims = {"success": success, "method": method, "server": server, "user_hash": user_hash}
        dims.update(dimensions)
        self.record(_ev.AUTH_REQUEST, duration_ms=duration_ms, dimensions=dims, metadata=metadata)

    def record_tool_execution(
        self,
        *,
        tool_name: str | None,
        success: bool,
        method: str = "tools/call",
        duration_ms: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        **dimensions: Any,
    ) -> None:
        """A `tool_execution` event; extra keyword arguments become dimensions
        (server_name, client_name, client_version, input_size_bytes, output_size_bytes,
        transport, session_id, protocol_version, error_type; metadata may carry trace_id and
        span_id)."""
        dims = {"method": method, "tool_name": tool_name, "success": success}
        dims.update(dimensions)
        self.record(_ev.TOOL_EXECUTION, duration_ms=duration_ms, dimensions=dims, metadata=metadata)

    def record_protocol_latency(
        self,
        *,
        flow_step: str,
        duration_ms: float,
        metadata: Mapping[str, Any] | None = None,
        **dimensions: Any,
    ) -> None:
        dims = {"flow_step": flow_step}
        dims.update(dimensions)
        self.record(
            _ev.PROTOCOL_LATENCY, duration_ms=duration_ms, dimensions=dims, metadata=metadata
        )

    def record_custom(
        self,
        name: str,
        value: float = 1.0,
        *,
        duration_ms: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        **dimensions: Any,
    ) -> None:
        """A `custom` event; `name` is stored as the `name` dimension."""
        dims = {"name": name}
        dims.update(dimensions)
        self.record(
            _ev.CUSTOM, value=value, duration_ms=duration_ms, dimensions=dims, metadata=metadata
        )

    def stats(self) -> ClientStats:
        with self._lock:
            return ClientStats(
                recorded=self._recorded,
                sent=self._sent,
                rejected=self._rejected,
                dropped_overflow=self._dropped_overflow,
                dropped_refused=self._dropped_refused,
                dropped_shutdown=self._dropped_shutdown,
                dropped_invalid=self._dropped_invalid,
                recovered=self._recovered,
                queued=self._spool.unbatched if self._spool is not None else len(self._queue),
                in_flight=sum(p.count for p in self._pending),
                retries=self._retries,
                batches_sent=self._batches_sent,
                last_error=self._last_error,
            )

    # -- sender side --------------------------------------------------------------------

    def _wake(self) -> None:
        raise NotImplementedError

    def _set_idle(self, idle: bool) -> None:
        """Tell flush() whether the sender has nothing left to do (each client has its event)."""
        raise NotImplementedError

    def _backlog(self) -> int:
        """Events not yet handled: queued (in memory or in the spool) and in flight."""
        queued = self._spool.unbatched if self._spool is not None else len(self._queue)
        return queued + sum(p.count for p in self._pending)

    def _event_line(self, event: dict[str, Any]) -> bytes | None:
        """The event as JSON, or None (dropped, counted, logged once) when a value in it is
        NaN or infinite: JSON has no such numbers and the service refuses the whole body."""
        try:
            return _encode_event(event).encode("utf-8", "surrogatepass")
        except ValueError:
            with self._lock:
                self._dropped_invalid += 1
            self._log_once(
                "non-finite",
                logging.WARNING,
                "dropped a %s event with a NaN or infinite value (JSON cannot carry it); "
                "the other events are sent",
                event.get("type"),
            )
            return None

    def _take_batch(self) -> bool:
        """Make the next batch `_pending` (its parts keep their idempotency keys across
        retries); False when there is nothing to send yet."""
        while not self._pending:
            with self._lock:
                spool = self._spool
                n = spool.unbatched if spool is not None else len(self._queue)
                if n == 0 or (n < self._batch_size and not (self._drain or self._closing)):
                    return False  # a partial batch waits for the interval, a flush or close()
                n = min(n, self._batch_size)
                if spool is not None:
                    lines, end = spool.peek(n)
                    parts, too_large = self._make_parts([line[:-1] for line in lines])
                    spool.take(parts, len(lines), end)
                    self._rejected += too_large
                else:
                    popleft = self._queue.popleft
                    events = [popleft() for _ in range(n)]
            if spool is None:
                lines = [line for line in map(self._event_line, events) if line is not None]
                parts, too_large = self._make_parts(lines)
                with self._lock:
                    self._rejected += too_large
            self._pending = parts  # empty when every event was dropped: take again
            self._attempt = 0
        return True

    def _make_parts(self, lines: list[bytes]) -> tuple[list[SpooledPart], int]:
        """POST bodies under the service's 1 MiB limit, each with a new idempotency key; and the
        number of events left out for being larger than that alone."""
        parts: list[SpooledPart] = []
        chunk: list[bytes] = []
        too_large = 0
        size = len(self._envelope_prefix) + 2
        for line in lines:
            if len(self._envelope_prefix) + len(line) + 2 > MAX_BODY_BYTES:
                too_large += 1
                self._log_once("too-large", logging.WARNING, "dropped a metric larger than 1 MiB")
                continue
            if chunk and size + len(line) + 1 > MAX_BODY_BYTES:
                parts.append(self._part(chunk))
                chunk, size = [], len(self._envelope_prefix) + 2
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            parts.append(self._part(chunk))
        return parts, too_large

    def _part(self, lines: list[bytes]) -> SpooledPart:
        body = self._envelope_prefix + b",".join(lines) + b"]}"
        return SpooledPart(uuid.uuid4().hex, body, len(lines))

    def _sender(self) -> Generator[_Step, object, None]:
        """The sender loop, once for both clients: it yields what to wait for (`_Step`) and is
        sent the outcome (True/False for a wake-up, the response or exception of a POST); the
        async and the threaded client only carry the steps out."""
        cfg = self.config
        while True:
            try:
                if not self._take_batch():
                    if not self._backlog():
                        self._drain = False
                        self._set_idle(True)
                        if self._closing:
                            return
                    if not (yield _Step(_WAIT, cfg.flush_interval_s)):
                        self._drain = True  # the interval passed: send partial batches too
                    continue
                self._set_idle(False)
                delay = yield from self._send_pending()
                if delay is None:
                    continue
                if self._closing:
                    if time.monotonic() + delay > self._deadline:
                        return
                    yield _Step(_SLEEP, delay)
                else:
                    # Only close() cuts the backoff short, not a filling queue.
                    yield _Step(_BACKOFF, delay)
            except Exception:
                logger.exception("metrics sender iteration failed; going on")
                yield _Step(_SLEEP, min(1.0, cfg.flush_interval_s))

    def _send_pending(self) -> Generator[_Step, object, float | None]:
        """POST the parts of `_pending` in order; None when all were answered, else the delay
        before retrying the rest (with the same keys)."""
        for i, part in enumerate(self._pending):
            reply = yield _Step(_POST, 0.0, part)
            if isinstance(reply, httpx.HTTPError):
                retry_after: float | None = self._on_transport_error(reply)
            elif isinstance(reply, httpx.Response):
                retry_after = self._handle_response(
                    reply.status_code, reply.headers, reply.content, part.count
                ).retry_after_s
            else:
                raise RuntimeError(f"unexpected outcome of a POST: {reply!r}")
            if retry_after is not None:
                self._pending = self._pending[i:]
                return self._retry_delay(retry_after)
            self._answered(part)
        self._pending = []
        self._attempt = 0
        return None

    def _handle_response(
        self, status: int, headers: Mapping[str, str], body: bytes, count: int
    ) -> _Delivery:
        if status == 200:
            accepted, rejected = count, 0
            try:
                parsed = json.loads(body)
                accepted = int(parsed.get("accepted", count))
                rejected = int(parsed.get("rejected", 0))
                if rejected:
                    first = (parsed.get("errors") or [{}])[0]
                    self._log_once(
                        f"rejected:{first.get('field')}:{first.get('rule')}",
                        logging.WARNING,
                        "metrics service rejected %d of %d events, e.g. %s: %s",
                        rejected,
                        count,
                        first.get("field"),
                        first.get("message"),
                    )
            except (ValueError, AttributeError, TypeError):
                pass
            with self._lock:
                self._sent += accepted
                self._rejected += rejected
                self._batches_sent += 1
            return _DONE
        if status in _RETRYABLE_STATUS or status >= 500:
            self._last_error = f"HTTP {status}"
            return _Delivery(_parse_retry_after(headers.get("retry-after")) or 0.0)
        # 400, 401, 403, 413, 415, 422 ...: the same body would fail again.
        with self._lock:
            if status == 422:
                self._rejected += count
            else:
                self._dropped_refused += count
        self._last_error = f"HTTP {status}"
        self._log_once(
            f"status:{status}",
            logging.ERROR,
            "metrics service refused a batch with HTTP %d (%s); dropping it and going on: %s",
            status,
            {401: "check METRICS_API_KEY", 403: "the key is not issued for this service name"}.get(
                status, "not retried"
            ),
            body[:200].decode("utf-8", "replace"),
        )
        return _DONE

    def _answered(self, part: SpooledPart) -> None:
        if self._spool is not None:
            with self._lock:
                self._spool.done(part)

    def _retry_delay(self, retry_after_s: float) -> float:
        cfg = self.config
        delay = backoff_delay(
            self._attempt, cfg.backoff_base_s, cfg.backoff_max_s, retry_after_s, self._random
        )
        self._attempt += 1
        with self._lock:
            self._retries += 1
        return delay

    def _on_transport_error(self, exc: Exception) -> float:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._log_once(
            "connect", logging.WARNING, "metrics service unreachable (%s); retrying", exc
        )
        return 0.0

    def _drop_remaining(self) -> None:
        if self._spool is not None:
            # Nothing is lost: the next client on this spool sends it.
            with self._lock:
                left = self._backlog()
                self._spool.close()
            if left:
                logger.info("metrics client closed; %d events wait in the spool", left)
            return
        with self._lock:
            lost = len(self._queue) + sum(p.count for p in self._pending)
            self._queue.clear()
            self._pending = []
            self._dropped_shutdown += lost
        if lost:
            logger.warning("metrics client closed with %d events undelivered", lost)

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.log(level, msg, *args)
