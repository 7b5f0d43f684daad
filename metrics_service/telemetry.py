"""OpenTelemetry export: every committed metric becomes counter and histogram values, scraped by
Prometheus (a ``prometheus_client`` collector on its own registry and port) and/or pushed over
OTLP (``MetricsData`` handed to the OTLP exporter every ``OTEL_METRIC_EXPORT_INTERVAL``).

Cost. The SDK spends 15-20 µs on each ``add``/``record`` (attribute cleaning and hashing), which
would cost more than storing the metric. So the aggregation is ours, in plain Python: a commit's
rows are grouped per label set and added to cumulative counters and explicit-bucket histograms
kept here, and a collection reads them. Both outputs go through public APIs only: custom
collectors are prometheus_client's way to expose values computed elsewhere, and an OTLP exporter
takes any ``MetricsData`` (the data model of ``opentelemetry.sdk.metrics.export``). Names, labels,
units, buckets and the ``target_info`` series are those the OpenTelemetry SDK and its Prometheus
exporter produce for the same instruments.

To add an instrument: one entry in ``INSTRUMENTS`` (and, for a rare-event counter, its known label
values in ``ZERO_SERIES``); counters are fed by ``Telemetry.add``, histograms by a recorder in
``_RECORDERS``, gauges by a callback in ``Telemetry._gauges``.

Cardinality. Labels come only from low-cardinality dimensions. Each instrument keeps at most
``METRICS_OTEL_CARDINALITY_LIMIT`` label sets; further ones go to one more series, labelled only
``otel_metric_overflow="true"``, as the OpenTelemetry SDK does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple, cast

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from metrics_service import __version__, storage
from metrics_service.auth import FAILURE_REASONS
from metrics_service.settings import BoolLabels, OtlpProtocol, Settings
from metrics_service.storage import rollups, schema
from metrics_service.validation import DIMENSIONS, REJECTION_RULES, Batch

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: The boundaries the OpenTelemetry MCP semantic conventions advise for their durations
#: (semantic-conventions-genai, model/mcp/metrics.yaml: 10 ms to 300 s, "LLMs will often be
#: involved here").
SEMCONV_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
RESULTS_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
BATCH_BUCKETS = (1, 10, 100, 1000, 5000, 10000, 50000)
#: The attribute of the overflow series (OpenTelemetry SDK, "cardinality limits").
OVERFLOW = {"otel.metric.overflow": True}

# Column positions in the rows built by ``validation`` (the column registry, storage/schema.py).
_COL = {kind: schema.row_positions(kind) for kind in DIMENSIONS}
_VALUE = schema.VALUE
_SUCCESS = {1: "true", 0: "false", None: "unknown"}
#: ``METRICS_OTEL_BOOL_LABELS=capitalized``: what dashboards built on the pinned reference expect.
_SUCCESS_CAPITALIZED = {1: "True", 0: "False", None: "unknown"}

#: The label names are the reference's (the MCP Gateway Registry exports each dimension under
#: its own name): its auth middleware sends ``server``, its tool and protocol events
#: ``server_name``, and its dashboard queries both (``label_values(mcp_auth_requests_total,
#: server)``, ``by (server_name)`` on tool executions).
AUTH_LABELS = ("service", "server", "method", "success")
TOOL_LABELS = ("service", "server_name", "method", "tool_name", "client_name", "success")
PROTOCOL_LABELS = ("service", "server_name", "client_name", "flow_step")
#: The reference's health-check labels (``endpoint``, ``status_code``, ``healthy``), plus the
#: ``server_name`` our clients may send; ``healthy`` is spelled as ``success`` is.
HEALTH_LABELS = ("service", "server_name", "endpoint", "status_code", "healthy")
SERVICE_LABELS = ("service",)
#: Attributes of mcp.{server,client}.operation.duration (docs/otlp.md); ``service`` is ours: one
#: exporter here aggregates many reporting services. Never session or request ids.
SEMCONV_LABELS = (
    "service",
    "mcp.method.name",
    "gen_ai.tool.name",
    "gen_ai.operation.name",
    "error.type",
    "rpc.response.status_code",
    "network.transport",
    "mcp.protocol.version",
)


class Instrument(NamedTuple):
    """One exported instrument. ``kind`` is ``counter`` (monotonic sum; ``_total`` in
    Prometheus), ``histogram`` (explicit ``buckets``) or ``gauge``; ``unit`` is UCUM as in
    OpenTelemetry (``s``, ``By``), mapped to the Prometheus suffix (``seconds``, ``bytes``)."""

    kind: str
    unit: str
    labels: tuple[str, ...]
    buckets: Sequence[float]
    description: str


INSTRUMENTS: dict[str, Instrument] = {
    "mcp_auth_requests": Instrument(
        "counter", "", AUTH_LABELS, (), "Authentication events (sum of value)"
    ),
    "mcp_tool_executions": Instrument(
        "counter", "", TOOL_LABELS, (), "MCP method calls (sum of value)"
    ),
    "mcp_tool_discovery": Instrument(
        "counter", "", SERVICE_LABELS, (), "Tool discovery searches (sum of value)"
    ),
    "mcp_auth_request_duration_seconds": Instrument(
        "histogram", "s", AUTH_LABELS, SECONDS_BUCKETS, "Authentication time"
    ),
    "mcp_tool_execution_duration_seconds": Instrument(
        "histogram", "s", TOOL_LABELS, SECONDS_BUCKETS, "MCP method execution time"
    ),
    "mcp_tool_input_size_bytes": Instrument(
        "histogram", "By", TOOL_LABELS, BYTES_BUCKETS, "Tool call input size"
    ),
    "mcp_tool_output_size_bytes": Instrument(
        "histogram", "By", TOOL_LABELS, BYTES_BUCKETS, "Tool call output size"
    ),
    "mcp_tool_discovery_duration_seconds": Instrument(
        "histogram", "s", SERVICE_LABELS, SECONDS_BUCKETS, "Discovery total time"
    ),
    "mcp_tool_discovery_embedding_duration_seconds": Instrument(
        "histogram", "s", SERVICE_LABELS, SECONDS_BUCKETS, "Discovery embedding time"
    ),
    "mcp_tool_discovery_search_duration_seconds": Instrument(
        "histogram", "s", SERVICE_LABELS, SECONDS_BUCKETS, "Discovery index search time"
    ),
    "mcp_tool_discovery_results": Instrument(
        "histogram", "", SERVICE_LABELS, RESULTS_BUCKETS, "Results returned per discovery"
    ),
    "mcp_protocol_latency_seconds": Instrument(
        "histogram", "s", PROTOCOL_LABELS, SECONDS_BUCKETS, "Time between MCP protocol steps"
    ),
    "mcp_health_checks": Instrument(
        "counter", "", HEALTH_LABELS, (), "Health checks of MCP servers (sum of value)"
    ),
    "mcp_health_check_duration_seconds": Instrument(
        "histogram", "s", HEALTH_LABELS, SECONDS_BUCKETS, "Health check duration"
    ),
    # The OpenTelemetry MCP semantic conventions (status Development), dotted as over OTLP;
    # Prometheus shows mcp_server_operation_duration_seconds{mcp_method_name=...}.
    "mcp.server.operation.duration": Instrument(
        "histogram",
        "s",
        SEMCONV_LABELS,
        SEMCONV_BUCKETS,
        "MCP request or notification duration as observed on the receiver from the time it was "
        "received until the result or ack is sent.",
    ),
    "mcp.client.operation.duration": Instrument(
        "histogram",
        "s",
        SEMCONV_LABELS,
        SEMCONV_BUCKETS,
        "The duration of the MCP request or notification as observed on the sender from the "
        "time it was sent until the response or ack is received.",
    ),
    "metrics_service_metrics_accepted": Instrument("counter", "", ("type",), (), "Metrics stored"),
    "metrics_service_metrics_rejected": Instrument(
        "counter", "", ("reason",), (), "Metrics rejected, by the rule they broke"
    ),
    "metrics_service_requests": Instrument(
        "counter", "", ("status",), (), "Ingest requests by HTTP status"
    ),
    "metrics_service_rate_limited_requests": Instrument(
        "counter", "", (), (), "Ingest requests refused by the rate limit"
    ),
    "metrics_service_auth_failures": Instrument(
        "counter", "", ("reason",), (), "Failed authentications"
    ),
    "metrics_service_commit_failures": Instrument("counter", "", (), (), "Failed commit attempts"),
    "metrics_service_retention_deleted_rows": Instrument(
        "counter", "", ("table",), (), "Rows deleted by retention"
    ),
    "metrics_service_export_failures": Instrument(
        "counter", "", ("exporter",), (), "Failed OTLP exports"
    ),
    "metrics_service_otlp_spans": Instrument(
        "counter",
        "",
        ("outcome",),
        (),
        "Spans received on /v1/traces: accepted (MCP, stored), rejected, not_mcp (dropped)",
    ),
    "metrics_service_commit_batch_metrics": Instrument(
        "histogram", "", (), BATCH_BUCKETS, "Metrics per commit"
    ),
    "metrics_service_commit_duration_seconds": Instrument(
        "histogram", "s", (), SECONDS_BUCKETS, "Commit duration"
    ),
    "metrics_service_queue_depth": Instrument("gauge", "", (), (), "Metrics waiting for a commit"),
    "metrics_service_database_size_bytes": Instrument(
        "gauge", "By", ("file",), (), "Size of the SQLite database file and its WAL"
    ),
}

#: Counters of rare events, exported at 0 from start for each of their known label values, so
#: that a healthy service shows 0 on dashboards and in alert expressions rather than no series
#: (Prometheus, "Instrumentation: avoid missing metrics").
ZERO_SERIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "metrics_service_commit_failures": ((),),
    "metrics_service_rate_limited_requests": ((),),
    "metrics_service_auth_failures": tuple((reason,) for reason in FAILURE_REASONS),
    "metrics_service_metrics_rejected": tuple((rule,) for rule in REJECTION_RULES),
    "metrics_service_retention_deleted_rows": tuple(
        (table,) for table in (*storage.TABLES, *rollups.TABLES)
    ),
    "metrics_service_export_failures": (("otlp",),),
    "metrics_service_otlp_spans": (("accepted",), ("rejected",), ("not_mcp",)),
}

#: The two name sets a setting can switch off: the semantic conventions' (dotted) and the
#: architecture document's (``mcp_*``); the self-metrics always stay.
SEMCONV_NAMES = frozenset(name for name in INSTRUMENTS if "." in name)
SEED_NAMES = frozenset(n for n in INSTRUMENTS if n.startswith("mcp_") and n not in SEMCONV_NAMES)

# UCUM unit -> Prometheus suffix, as the OpenTelemetry Prometheus exporter maps them.
_PROMETHEUS_UNITS = {"": "", "s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}
_TARGET_INFO = ("target", "Target metadata")  # exposed as ``target_info``, as OTel does


#: Fewer values than this are counted one by one; from there on, sorting them first is cheaper.
_SORT_FROM = 8


class _Counter:
    """A cumulative counter, capped at ``limit`` label sets (then one overflow series)."""

    __slots__ = ("labels", "limit", "overflow", "values")

    def __init__(self, labels: tuple[str, ...], limit: int) -> None:
        self.labels = labels
        self.limit = limit
        self.values: dict[tuple[Any, ...], float] = {}
        self.overflow: float | None = None

    def add(self, key: tuple[Any, ...], amount: float) -> None:
        # Called on the event loop only; a collection runs on another thread and copies the dict
        # in one C call (atomic under the GIL).
        values = self.values
        if key in values:
            values[key] += amount
        elif len(values) < self.limit:  # as the SDK: the overflow series comes on top
            values[key] = amount
        else:
            self.overflow = (self.overflow or 0) + amount

    def points(self) -> list[tuple[dict[str, Any], float]]:
        labels = self.labels
        points: list[tuple[dict[str, Any], float]] = [
            (dict(zip(labels, key, strict=True)), value) for key, value in list(self.values.items())
        ]
        if self.overflow is not None:
            points.append((OVERFLOW, self.overflow))
        return points


@dataclass(slots=True)
class _HistogramPoint:
    counts: list[int]
    count: int
    sum: float
    min: float
    max: float


class _Histogram:
    """A cumulative explicit-bucket histogram per label set, capped like ``_Counter``.

    Bucket i counts the values ``<= bounds[i]`` (and above ``bounds[i - 1]``); the last bucket
    the values above the last bound, as OpenTelemetry's explicit buckets."""

    __slots__ = ("bounds", "labels", "limit", "overflow", "series")

    def __init__(self, labels: tuple[str, ...], bounds: Sequence[float], limit: int) -> None:
        self.labels = labels
        self.bounds = bounds
        self.limit = limit
        self.series: dict[tuple[str, ...], _HistogramPoint] = {}
        self.overflow: _HistogramPoint | None = None

    def add(self, key: tuple[str, ...], value: float) -> None:
        self.add_all(key, [value])

    def add_all(self, key: tuple[str, ...], values: list[float]) -> None:
        """``add`` for each of ``values`` (not empty), with one lookup of the series."""
        point = self.series.get(key)
        if point is None:
            if len(self.series) < self.limit:
                point = self.series[key] = self._empty(values[0])
            else:
                point = self.overflow = self.overflow or self._empty(values[0])
        counts, bounds, n = point.counts, self.bounds, len(values)
        if n == 1:
            low = high = values[0]
            counts[bisect_left(bounds, low)] += 1
        elif n < _SORT_FROM:
            for value in values:
                counts[bisect_left(bounds, value)] += 1
            low, high = min(values), max(values)
        else:
            # Sorted once (in C), the values of each occupied bucket are one run, counted with a
            # bisect: a few steps per group instead of one per value.
            ordered = sorted(values)
            last, i = len(bounds), 0
            while i < n:
                bucket = bisect_left(bounds, ordered[i])
                if bucket == last:
                    counts[bucket] += n - i
                    break
                j = bisect_right(ordered, bounds[bucket], i)
                counts[bucket] += j - i
                i = j
            # The sort is stable: the first of equal values (0.0 and -0.0) comes first, as
            # ``min`` and ``max`` return the first of equal values.
            low, high = ordered[0], ordered[bisect_left(ordered, ordered[-1])]
        point.count += n
        point.sum += sum(values)  # in row order, as before: the same float sum to the last bit
        if low < point.min:  # as min(point.min, low): the first of equal values stays
            point.min = low
        if high > point.max:
            point.max = high

    def _empty(self, first: float) -> _HistogramPoint:
        return _HistogramPoint([0] * (len(self.bounds) + 1), 0, 0.0, first, first)

    def points(self) -> list[tuple[dict[str, Any], _HistogramPoint]]:
        """A copy (the caller holds the lock that ``add_all`` runs under)."""
        labels = self.labels
        points: list[tuple[dict[str, Any], _HistogramPoint]] = [
            (dict(zip(labels, key, strict=True)), _copy(p)) for key, p in self.series.items()
        ]
        if self.overflow is not None:
            points.append((OVERFLOW, _copy(self.overflow)))
        return points


def _copy(p: _HistogramPoint) -> _HistogramPoint:
    return _HistogramPoint(list(p.counts), p.count, p.sum, p.min, p.max)


#: One collection: (name, instrument, [(attributes, value)]) per instrument with data.
Snapshot = list[tuple[str, Instrument, list[tuple[dict[str, Any], Any]]]]


class _PrometheusCollector(Collector):
    """Exposes a snapshot in the shape the OpenTelemetry Prometheus exporter gives the same
    data: one family per instrument, label names padded with "" across a family's series."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._info: InfoMetricFamily | None = None

    def collect(self) -> Iterator[Any]:
        if self._info is None:
            attributes = {
                _label_name(k): _label_value(v)
                for k, v in self._telemetry.resource.attributes.items()
            }
            self._info = InfoMetricFamily(*_TARGET_INFO, value=attributes)
        yield self._info
        for dotted, instrument, points in self._telemetry.snapshot():
            name = _label_name(dotted)  # mcp.server.operation.duration -> mcp_server_...
            named = [({_label_name(k): v for k, v in a.items()}, value) for a, value in points]
            keys = sorted({k for attributes, _ in named for k in attributes})
            rows = [([_label_value(a.get(k, "")) for k in keys], value) for a, value in named]
            unit = _PROMETHEUS_UNITS[instrument.unit]
            desc = instrument.description
            if instrument.kind == "counter":
                counter = CounterMetricFamily(name, desc, labels=keys, unit=unit)
                for values, value in rows:
                    counter.add_metric(values, value)
                yield counter
            elif instrument.kind == "gauge":
                gauge = GaugeMetricFamily(name, desc, labels=keys, unit=unit)
                for values, value in rows:
                    gauge.add_metric(values, value)
                yield gauge
            else:
                histogram = HistogramMetricFamily(name, desc, labels=keys, unit=unit)
                bounds = [f"{b}" for b in instrument.buckets] + ["+Inf"]
                for values, point in rows:
                    cumulative, buckets = 0, []
                    for bound, n in zip(bounds, point.counts, strict=True):
                        cumulative += n
                        buckets.append((bound, cumulative))
                    histogram.add_metric(values, buckets, point.sum)
                yield histogram


@functools.cache
def _label_name(key: str) -> str:
    """An attribute key as a Prometheus label name (``otel.metric.overflow`` ->
    ``otel_metric_overflow``). Keys come from ``INSTRUMENTS`` and the resource: a few dozen."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)
    return "_" + name[1:] if name[:1].isdigit() else name


def _label_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class _OtlpPush:
    """Every ``interval_s``, hands a collection to the OTLP exporter on its own thread (as the
    SDK's ``PeriodicExportingMetricReader`` does), once more at shutdown; counts and logs (once
    per outage) the failed exports."""

    def __init__(
        self,
        exporter: MetricExporter,
        collect: Callable[[], MetricsData],
        interval_s: float,
        timeout_ms: float,
        on_failure: Callable[[], None],
    ) -> None:
        self._exporter = exporter
        self._collect = collect
        self._interval_s = interval_s
        self._timeout_ms = timeout_ms
        self._on_failure = on_failure
        self._failing = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one export at a time
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.export()

    def export(self) -> bool:
        with self._lock:
            try:
                result = self._exporter.export(self._collect(), timeout_millis=self._timeout_ms)
            except Exception:
                log.debug("OTLP export raised", exc_info=True)
                result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            if self._failing:
                log.info("OTLP export works again")
            self._failing = False
            return True
        self._on_failure()
        if not self._failing:
            log.warning(
                "OTLP export failed; counting failures in metrics_service_export_failures_total"
            )
        self._failing = True
        return False

    def shutdown(self, timeout_s: float) -> None:
        """The last export, then the exporter's shutdown, within ``timeout_s`` overall."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._lock.release()
            self._timeout_ms = min(self._timeout_ms, max(0.0, deadline - time.monotonic()) * 1000)
            self.export()
        self._exporter.shutdown(timeout_millis=max(0.0, deadline - time.monotonic()) * 1000)


def _stop_server(httpd: Any) -> None:
    """Stop the Prometheus endpoint's server at once. ``shutdown()`` waits for its
    ``serve_forever`` loop, which looks for the request to stop only between polls of half a
    second; a connection to its own socket ends the poll, so the loop sees it now."""
    stopping = threading.Thread(target=httpd.shutdown, name="prometheus-shutdown", daemon=True)
    stopping.start()
    host, port = httpd.server_address[:2]
    while stopping.is_alive():
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=0.2).close()
        stopping.join(0.02)
    httpd.server_close()


def _otlp_exporter(settings: Settings) -> MetricExporter:
    timeout_s = settings.otlp_timeout_ms / 1000
    headers = settings.otlp_header_map() or None
    base = (settings.otlp_endpoint or "").rstrip("/")
    if settings.otlp_protocol is OtlpProtocol.grpc:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as Grpc,
        )

        endpoint = settings.otlp_metrics_endpoint or base
        return Grpc(
            endpoint=endpoint,
            insecure=endpoint.startswith("http://"),
            headers=headers,
            timeout=timeout_s,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    endpoint = settings.otlp_metrics_endpoint or f"{base}/v1/metrics"
    return Http(endpoint=endpoint, headers=headers, timeout=timeout_s)


class Telemetry:
    """The service's instruments, their per-commit recording and the two ways out."""

    def __init__(self, settings: Settings, *, queue_depth: Callable[[], int] = lambda: 0) -> None:
        self._settings = settings
        self._queue_depth = queue_depth
        self.resource = Resource.create(
            {"service.name": settings.otel_service_name, "service.version": __version__}
        )
        self._scope = InstrumentationScope("metrics_service", __version__)
        self._start_ns = time.time_ns()
        limit = settings.otel_cardinality_limit
        self.success_labels = (
            _SUCCESS_CAPITALIZED
            if settings.otel_bool_labels is BoolLabels.capitalized
            else _SUCCESS
        )
        self.seed = settings.otel_seed_metrics_enabled
        self.semconv = settings.otel_semconv_metrics_enabled
        off = (SEED_NAMES if not self.seed else frozenset()) | (
            SEMCONV_NAMES if not self.semconv else frozenset()
        )
        self.exported = {name: i for name, i in INSTRUMENTS.items() if name not in off}
        self.totals: dict[str, _Counter] = {}
        self.histograms: dict[str, _Histogram] = {}
        for name, instrument in INSTRUMENTS.items():
            if instrument.kind == "counter":
                zeros = ZERO_SERIES.get(name, ())
                # The zero series are not counted against the cap: they are few and fixed.
                counter = self.totals[name] = _Counter(instrument.labels, limit + len(zeros))
                for key in zeros:
                    counter.add(key, 0)
            elif instrument.kind == "histogram":
                self.histograms[name] = _Histogram(instrument.labels, instrument.buckets, limit)
        self._gauges: dict[str, Callable[[], Iterable[tuple[dict[str, Any], int]]]] = {
            "metrics_service_queue_depth": lambda: [({}, self._queue_depth())],
            "metrics_service_database_size_bytes": self._db_size,
        }
        # Histograms are updated on the event loop and read by a scrape or an export thread.
        self._lock = threading.Lock()

        self.registry = CollectorRegistry(auto_describe=True)
        self._http: Any = None
        self.prometheus_port: int | None = None
        if settings.otel_prometheus_enabled:
            self.registry.register(_PrometheusCollector(self))
        self.otlp_enabled = bool(settings.otlp_endpoint or settings.otlp_metrics_endpoint)
        self._otlp: _OtlpPush | None = None
        if self.otlp_enabled:
            self._otlp = _OtlpPush(
                _otlp_exporter(settings),
                self.collect,
                settings.otel_export_interval_ms / 1000,
                settings.otlp_timeout_ms,
                lambda: self.add("metrics_service_export_failures", ("otlp",)),
            )

    def _db_size(self) -> Iterable[tuple[dict[str, Any], int]]:
        path = str(self._settings.db_path)
        for label, file in (("db", path), ("wal", f"{path}-wal")):
            try:
                size = os.stat(file).st_size
            except OSError:
                size = 0
            yield {"file": label}, size

    # -- the hooks the app calls ----------------------------------------------------------------

    def add(self, name: str, key: tuple[Any, ...] = (), amount: float = 1) -> None:
        self.totals[name].add(key, amount)

    def on_request(self, status: int) -> None:
        self.totals["metrics_service_requests"].add((str(status),), 1)

    def on_retention_deleted(self, table: str, rows: int) -> None:
        self.totals["metrics_service_retention_deleted_rows"].add((table,), rows)

    def on_spans(self, *, accepted: int, rejected: int, not_mcp: int) -> None:
        totals = self.totals["metrics_service_otlp_spans"]
        for outcome, n in (("accepted", accepted), ("rejected", rejected), ("not_mcp", not_mcp)):
            if n:
                totals.add((outcome,), n)

    def on_rejections(self, batch: Batch) -> None:
        totals = self.totals["metrics_service_metrics_rejected"]
        for rejection in batch.rejections:
            totals.add((rejection.rule,), 1)

    def on_commit(self, batches: Sequence[Batch], size: int, elapsed_s: float) -> None:
        """Account a commit: rows grouped per label set, each group added once."""
        accepted = self.totals["metrics_service_metrics_accepted"]
        hist = self.histograms.__getitem__
        # The rows of every batch of the commit, per type: each recorder runs once per commit
        # (a commit of small requests carries many batches of a row or two).
        by_kind: dict[str, list[list[Row]]] = {}
        for batch in batches:
            for kind, rows in batch.rows.items():
                lists = by_kind.get(kind)
                if lists is None:
                    by_kind[kind] = [rows]
                else:
                    lists.append(rows)
        with self._lock:
            for kind, lists in by_kind.items():
                rows = lists[0] if len(lists) == 1 else list(chain.from_iterable(lists))
                accepted.add((kind,), len(rows))
                record = _RECORDERS.get(kind)
                if record is not None:
                    record(self, rows, hist)
            hist("metrics_service_commit_batch_metrics").add((), size)
            hist("metrics_service_commit_duration_seconds").add((), elapsed_s)

    # -- collection ------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every instrument's current points, in ``INSTRUMENTS`` order (thread-safe)."""
        with self._lock:
            histograms = {name: h.points() for name, h in self.histograms.items()}
        out: Snapshot = []
        for name, instrument in self.exported.items():
            points: list[tuple[dict[str, Any], Any]]
            if instrument.kind == "counter":
                points = list(self.totals[name].points())
            elif instrument.kind == "histogram":
                points = list(histograms[name])
            else:
                points = list(self._gauges[name]())
            if points:
                out.append((name, instrument, points))
        return out

    def collect(self) -> MetricsData:
        """The snapshot as OpenTelemetry's data model (cumulative temporality), for OTLP."""
        now = time.time_ns()
        start = self._start_ns
        metrics = []
        for name, instrument, points in self.snapshot():
            if name in SEMCONV_NAMES:
                # The conventions' attributes are absent, not empty, where they do not apply.
                points = [({k: v for k, v in a.items() if v != ""}, p) for a, p in points]
            data: Sum | Histogram | Gauge
            if instrument.kind == "counter":
                data = Sum(
                    [NumberDataPoint(a, start, now, v) for a, v in points],
                    AggregationTemporality.CUMULATIVE,
                    is_monotonic=True,
                )
            elif instrument.kind == "histogram":
                bounds = list(instrument.buckets)
                data = Histogram(
                    [
                        HistogramDataPoint(
                            a, start, now, p.count, p.sum, p.counts, bounds, p.min, p.max
                        )
                        for a, p in points
                    ],
                    AggregationTemporality.CUMULATIVE,
                )
            else:
                data = Gauge([NumberDataPoint(a, start, now, v) for a, v in points])
            metrics.append(Metric(name, instrument.description, instrument.unit, data))
        return MetricsData(
            [ResourceMetrics(self.resource, [ScopeMetrics(self._scope, metrics, "")], "")]
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._settings.otel_prometheus_enabled:
            from prometheus_client import start_http_server

            host, port = self._settings.otel_prometheus_host, self._settings.otel_prometheus_port
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
            self.prometheus_port = self._http.server_port
            log.info("Prometheus endpoint on http://%s:%d/metrics", host, self.prometheus_port)
        if self._otlp is not None:
            self._otlp.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Close the Prometheus endpoint; push the last values over OTLP within ``timeout_s``.
        Blocking: the app runs it on a worker thread. Idempotent."""
        if self._http is not None:
            _stop_server(self._http)
            self._http = None
        otlp, self._otlp = self._otlp, None
        if otlp is not None:
            started = time.monotonic()
            try:
                otlp.shutdown(timeout_s)
            except Exception:
                log.exception("OTLP exporter shutdown failed")
            log.info("OpenTelemetry stopped in %.1f s", time.monotonic() - started)


Row = tuple[Any, ...]
_value = itemgetter(_VALUE)


def _by_label(rows: list[Row], *columns: int) -> dict[Any, list[Row]]:
    """Rows grouped by the values of ``columns``, in the order the groups first appear. The
    per-label work is then done once per group and the per-row work is a few comprehensions: a
    commit holds few label sets and many rows."""
    keys = list(map(itemgetter(*columns), rows))
    if not keys:
        return {}
    first = keys[0]
    # One label set for the whole commit is common; equality is cheaper than hashing the
    # strings of every row (each row has its own).
    if first == keys[-1] and keys.count(first) == len(keys):
        return {first: rows}
    groups: dict[Any, list[Row]] = {}
    get = groups.get
    for key, r in zip(keys, rows, strict=True):
        group = get(key)
        if group is None:
            groups[key] = [r]
        else:
            group.append(r)
    return groups


#: ``_blank(v, v)``: "" for None, any other value unchanged (a C call, no Python frame).
_blank = cast(Callable[[str | None, str | None], str], {None: ""}.get)


def _labels(values: Sequence[str | None]) -> tuple[str, ...]:
    return tuple(map(_blank, values, values))


def _seconds(group: list[Row], i: int) -> list[float]:
    return [r[i] / 1000.0 for r in group if r[i] is not None]


def _present(group: list[Row], i: int) -> list[Any]:
    return [r[i] for r in group if r[i] is not None]


def _auth(t: Telemetry, rows: list[Row], hist: Callable[[str], _Histogram]) -> None:
    if not t.seed:
        return
    c = _COL["auth_request"]
    totals = t.totals["mcp_auth_requests"]
    durations = hist("mcp_auth_request_duration_seconds")
    for (*text, success), group in _by_label(
        rows, 2, c["server"], c["method"], c["success"]
    ).items():
        key = (*_labels(text), t.success_labels[success])
        totals.add(key, sum(map(_value, group)))
        if values := _seconds(group, 6):
            durations.add_all(key, values)


_TOOL = _COL["tool_execution"]
#: Every label column of the tool instruments, the seed ones (``TOOL_LABELS``) first, then the
#: ones only the semantic conventions use; ``_SEED_KEY`` and ``_OPERATION_KEY`` pick each set.
_TOOL_COLUMNS = (
    2,
    _TOOL["server_name"],
    _TOOL["method"],
    _TOOL["tool_name"],
    _TOOL["client_name"],
    _TOOL["success"],
    _TOOL["error_type"],
    _TOOL["transport"],
    _TOOL["protocol_version"],
)
_SEED_KEY = itemgetter(0, 1, 2, 3, 4, 5)
_OPERATION_KEY = itemgetter(0, 2, 3, 5, 6, 7, 8)  # service, method, tool, success, error, ...


#: The rows of a commit with the same values in every tool label column (and on the same side,
#: client or server): their positions in the commit, the rows, their durations in seconds.
_ToolGroup = tuple[list[int], list[Row], list[float]]


def _tool(t: Telemetry, rows: list[Row], hist: Callable[[str], _Histogram]) -> None:
    """The seed instruments and the semantic conventions' durations, from one grouping of the
    rows by every label column either uses: each instrument's series is a union of those groups
    (usually one), its values taken in row order as a grouping of its own would take them."""
    if not (t.seed or t.semconv):
        return
    client = _client_marks(rows) if t.semconv else None
    key_of = itemgetter(*_TOOL_COLUMNS)
    keys: Iterable[Any] = map(key_of, rows)
    if client is not None:
        keys = zip(keys, client, strict=True)
    positions: dict[Any, list[int]] = {}
    get = positions.get
    for i, key in enumerate(keys):
        found = get(key)
        if found is None:
            positions[key] = [i]
        else:
            found.append(i)
    groups: list[tuple[tuple[Any, ...], bool, _ToolGroup]] = []
    for key, where in positions.items():
        part = rows if len(where) == len(rows) else list(map(rows.__getitem__, where))
        labels, is_client = (key, False) if client is None else key
        groups.append((labels, is_client, (where, part, _seconds(part, 6))))
    if t.semconv:
        _semconv(groups, rows, hist)
    if t.seed:
        _seed_tool(t, groups, rows, hist)


def _client_marks(rows: list[Row]) -> list[bool] | None:
    """Per row, whether it is a client-side operation; None when none is (the usual case, found
    with one search: the mark has no newline, so it cannot straddle two rows' JSON)."""
    extras = list(map(itemgetter(-2), rows))  # the extra-dimensions JSON, second to last
    if _CLIENT_MARK not in "\n".join(filter(None, extras)):
        return None
    return [e is not None and _CLIENT_MARK in e for e in extras]


def _union(rows: list[Row], members: list[_ToolGroup]) -> _ToolGroup:
    """Groups as one, their rows back in commit order."""
    if len(members) == 1:
        return members[0]
    where = sorted(chain.from_iterable(m[0] for m in members))
    part = list(map(rows.__getitem__, where))
    return where, part, _seconds(part, 6)


def _seed_tool(
    t: Telemetry,
    groups: list[tuple[tuple[Any, ...], bool, _ToolGroup]],
    rows: list[Row],
    hist: Callable[[str], _Histogram],
) -> None:
    totals = t.totals["mcp_tool_executions"]
    durations = hist("mcp_tool_execution_duration_seconds")
    inputs = hist("mcp_tool_input_size_bytes")
    outputs = hist("mcp_tool_output_size_bytes")
    i_in, i_out = _TOOL["input_size_bytes"], _TOOL["output_size_bytes"]
    series: dict[tuple[Any, ...], list[_ToolGroup]] = {}
    for labels, _, group in groups:
        series.setdefault(_SEED_KEY(labels), []).append(group)
    for (*text, success), members in series.items():
        _, part, seconds = members[0] if len(members) == 1 else _union(rows, members)
        key = (*_labels(text), t.success_labels[success])
        totals.add(key, sum(map(_value, part)))
        if seconds:
            durations.add_all(key, seconds)
        if sizes := _present(part, i_in):
            inputs.add_all(key, sizes)
        if sizes := _present(part, i_out):
            outputs.add_all(key, sizes)


def _discovery(t: Telemetry, rows: list[Row], hist: Callable[[str], _Histogram]) -> None:
    if not t.seed:
        return
    c = _COL["tool_discovery"]
    i_results, i_embed, i_search = c["results_count"], c["embedding_time_ms"], c["search_time_ms"]
    totals = t.totals["mcp_tool_discovery"]
    for service, group in _by_label(rows, 2).items():
        key = (service,)
        totals.add(key, sum(map(_value, group)))
        for name, values in (
            ("mcp_tool_discovery_duration_seconds", _seconds(group, 6)),
            ("mcp_tool_discovery_embedding_duration_seconds", _seconds(group, i_embed)),
            ("mcp_tool_discovery_search_duration_seconds", _seconds(group, i_search)),
            ("mcp_tool_discovery_results", _present(group, i_results)),
        ):
            if values:
                hist(name).add_all(key, values)


def _protocol(t: Telemetry, rows: list[Row], hist: Callable[[str], _Histogram]) -> None:
    if not t.seed:
        return
    c = _COL["protocol_latency"]
    latency = hist("mcp_protocol_latency_seconds")
    for text, group in _by_label(
        rows, 2, c["server_name"], c["client_name"], c["flow_step"]
    ).items():
        if values := _seconds(group, 6):
            latency.add_all(_labels(text), values)


#: ``transport`` as stored -> the semconv ``network.transport`` (stdio is a pipe; the HTTP
#: transports run over TCP); values already in semconv terms pass unchanged.
_NETWORK_TRANSPORT = {"stdio": "pipe", "streamable-http": "tcp", "sse": "tcp", "websocket": "tcp"}
#: How a row marks a client-side operation (``span_kind`` in the extra dimensions, as msgspec
#: encodes it); everything else is server-side, as the middleware and server spans are.
_CLIENT_MARK = '"span_kind":"client"'


def _semconv(
    groups: list[tuple[tuple[Any, ...], bool, _ToolGroup]],
    rows: list[Row],
    hist: Callable[[str], _Histogram],
) -> None:
    """mcp.{server,client}.operation.duration from tool_execution rows (docs/otlp.md)."""
    sides: tuple[dict[tuple[Any, ...], list[_ToolGroup]], ...] = ({}, {})  # server, client
    for labels, is_client, group in groups:
        sides[is_client].setdefault(_OPERATION_KEY(labels), []).append(group)
    for name, operations in zip(
        ("mcp.server.operation.duration", "mcp.client.operation.duration"), sides, strict=True
    ):
        if not operations:
            continue
        durations = hist(name)
        for labels, members in operations.items():
            values = (members[0] if len(members) == 1 else _union(rows, members))[2]
            if not values:
                continue
            service, method, tool, success, error, transport, version = labels
            code = error if error is not None and error.lstrip("-").isdigit() else None
            key = (
                service,
                method or "",
                tool or "",
                "execute_tool" if method == "tools/call" else "",
                (error or "_OTHER") if success == 0 else "",  # if and only if it failed
                code or "",
                _NETWORK_TRANSPORT.get(transport, transport) or "",
                version or "",
            )
            durations.add_all(key, values)


def _health(t: Telemetry, rows: list[Row], hist: Callable[[str], _Histogram]) -> None:
    if not t.seed:
        return
    c = _COL["health_check"]
    columns = (2, c["server_name"], c["endpoint"], c["status_code"], c["healthy"])
    totals = t.totals["mcp_health_checks"]
    durations = hist("mcp_health_check_duration_seconds")
    for (service, server, endpoint, status, healthy), group in _by_label(rows, *columns).items():
        code = "" if status is None else str(status)
        key = (service, server or "", endpoint or "", code, t.success_labels[healthy])
        totals.add(key, sum(map(_value, group)))
        if values := _seconds(group, 6):
            durations.add_all(key, values)


#: metric type -> the function that records a commit's rows of that type. ``registry_operation``
#: and ``custom`` are stored only: the reference exports no instrument for them either.
_RECORDERS: dict[str, Callable[[Telemetry, list[Row], Callable[[str], _Histogram]], None]] = {
    "auth_request": _auth,
    "tool_execution": _tool,
    "tool_discovery": _discovery,
    "protocol_latency": _protocol,
    "health_check": _health,
}

__all__ = [
    "BYTES_BUCKETS",
    "INSTRUMENTS",
    "SECONDS_BUCKETS",
    "SEMCONV_BUCKETS",
    "ZERO_SERIES",
    "Instrument",
    "Telemetry",
]
