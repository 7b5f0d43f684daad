"""The recording side of the client and its delivery policy, shared by both senders.

Recording appends a dict to a bounded deque and returns; it never blocks and never raises. When
the queue is full the oldest event is dropped and counted. The policy half decides what a
response means: 200 counts accepted/rejected, connection errors, 5xx, 429 and 503 are retried
with exponential backoff and full jitter (never sooner than Retry-After), and any other 4xx drops
the batch, counted and logged once.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from . import events as _ev
from .config import ClientConfig

__all__ = ["ClientStats", "Recorder"]

logger = logging.getLogger("mcp_metrics")

MAX_BODY_BYTES = 1024 * 1024  # the service's request body limit
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 600.0  # a Retry-After beyond this is treated as this
_USER_AGENT = "mcp-metrics-client/0.1"
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


@dataclass(frozen=True)
class ClientStats:
    """Counters since the client was built. Every recorded event ends in exactly one of
    sent, rejected, dropped_* or is still queued/in flight."""

    recorded: int
    sent: int
    rejected: int
    dropped_overflow: int
    dropped_refused: int
    dropped_shutdown: int
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
        self._pending: list[dict[str, Any]] = []
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
        self._active = cfg.active
        # counters
        self._recorded = 0
        self._sent = 0
        self._rejected = 0
        self._dropped_overflow = 0
        self._dropped_refused = 0
        self._dropped_shutdown = 0
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
                queued=len(self._queue),
                in_flight=len(self._pending),
                retries=self._retries,
                batches_sent=self._batches_sent,
                last_error=self._last_error,
            )

    # -- sender side --------------------------------------------------------------------

    def _wake(self) -> None:
        raise NotImplementedError

    def _take_batch(self) -> bool:
        """Move up to one batch from the queue into `_pending`; False when there was nothing."""
        if self._pending:
            return True
        with self._lock:
            n = len(self._queue)
            if n == 0 or (n < self._batch_size and not (self._drain or self._closing)):
                return False  # a partial batch waits for the interval, a flush or close()
            n = min(n, self._batch_size)
            popleft = self._queue.popleft
            self._pending = [popleft() for _ in range(n)]
        self._attempt = 0
        return True

    def _encode(self, batch: list[dict[str, Any]]) -> list[tuple[bytes, list[dict[str, Any]]]]:
        """JSON bodies under the service's 1 MiB limit, splitting the batch when needed."""
        body = _encode_json({**self._envelope_head, "metrics": batch}).encode()
        if len(body) <= MAX_BODY_BYTES:
            return [(body, batch)]
        if len(batch) == 1:
            with self._lock:
                self._rejected += 1
            self._log_once("too-large", logging.WARNING, "dropped a metric larger than 1 MiB")
            return []
        mid = len(batch) // 2
        return self._encode(batch[:mid]) + self._encode(batch[mid:])

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

    def _retry_delay(self, retry_after_s: float) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        cfg = self.config
        cap = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        with self._lock:
            self._retries += 1
        delay = random.uniform(cfg.backoff_base_s / 2, max(cap, cfg.backoff_base_s / 2))
        if retry_after_s > 0:
            delay = retry_after_s + random.uniform(0, min(1.0, retry_after_s / 10))
        return delay

    def _parts(self) -> list[tuple[bytes, list[dict[str, Any]]]]:
        return self._encode(self._pending)

    def _on_transport_error(self, exc: Exception) -> float:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._log_once(
            "connect", logging.WARNING, "metrics service unreachable (%s); retrying", exc
        )
        return 0.0

    def _on_response(self, response: httpx.Response, count: int) -> float | None:
        outcome = self._handle_response(
            response.status_code, response.headers, response.content, count
        )
        return outcome.retry_after_s

    def _conclude(self, retry_after: float | None, remaining: list[dict[str, Any]]) -> float | None:
        if retry_after is None:
            self._pending = []
            self._attempt = 0
            return None
        self._pending = remaining
        return self._retry_delay(retry_after)

    def _drop_remaining(self) -> None:
        with self._lock:
            lost = len(self._queue) + len(self._pending)
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
