"""OpenTelemetry export: every committed metric becomes counter and histogram measurements,
scraped by Prometheus (``PrometheusMetricReader`` on its own registry and port) and/or pushed
over OTLP (``PeriodicExportingMetricReader``).

Cost. The SDK spends 15-20 µs on each ``add``/``record`` (attribute cleaning and hashing), which
would cost more than storing the metric. So a commit is first aggregated here in plain Python, per
label set: counters are kept as our own running totals and reported through observable counters
(exact, and cumulative by nature), and histograms receive one "bulk" measurement per label set
per commit, which a small subclass of the SDK's explicit-bucket aggregation merges bucket by
bucket. A start-up self-test proves the subclass against the installed SDK; if it fails, we fall
back to one ``record`` per value (correct, slower) and log it.

Cardinality. Labels come only from low-cardinality dimensions. Each instrument keeps at most
``METRICS_OTEL_CARDINALITY_LIMIT`` label sets; further ones go to one more series, labelled only
``otel_metric_overflow="true"``, as the OpenTelemetry SDK does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from metrics_service import __version__
from metrics_service.settings import OtlpProtocol, Settings
from metrics_service.validation import DIMENSIONS, Batch

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
OVERFLOW = {"otel.metric.overflow": True}

# Column positions of the typed dimensions in the rows built by ``validation``.
_COL = {
    kind: {name: 7 + i for i, (name, _) in enumerate(spec)} for kind, spec in DIMENSIONS.items()
}
_SUCCESS = {1: "true", 0: "false", None: "unknown"}

AUTH_LABELS = ("service", "server", "method", "success")
TOOL_LABELS = ("service", "server", "method", "tool_name", "client_name", "success")
PROTOCOL_LABELS = ("service", "server", "client_name", "flow_step")
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

#: name -> (kind, unit, labels, buckets, description). Counter names get ``_total`` in Prometheus.
INSTRUMENTS: dict[str, tuple[str, str, tuple[str, ...], Sequence[float], str]] = {
    "mcp_auth_requests": ("counter", "", AUTH_LABELS, (), "Authentication events (sum of value)"),
    "mcp_tool_executions": ("counter", "", TOOL_LABELS, (), "MCP method calls (sum of value)"),
    "mcp_tool_discovery": (
        "counter",
        "",
        SERVICE_LABELS,
        (),
        "Tool discovery searches (sum of value)",
    ),
    "mcp_auth_request_duration_seconds": (
        "histogram",
        "s",
        AUTH_LABELS,
        SECONDS_BUCKETS,
        "Authentication time",
    ),
    "mcp_tool_execution_duration_seconds": (
        "histogram",
        "s",
        TOOL_LABELS,
        SECONDS_BUCKETS,
        "MCP method execution time",
    ),
    "mcp_tool_input_size_bytes": (
        "histogram",
        "By",
        TOOL_LABELS,
        BYTES_BUCKETS,
        "Tool call input size",
    ),
    "mcp_tool_output_size_bytes": (
        "histogram",
        "By",
        TOOL_LABELS,
        BYTES_BUCKETS,
        "Tool call output size",
    ),
    "mcp_tool_discovery_duration_seconds": (
        "histogram",
        "s",
        SERVICE_LABELS,
        SECONDS_BUCKETS,
        "Discovery total time",
    ),
    "mcp_tool_discovery_embedding_duration_seconds": (
        "histogram",
        "s",
        SERVICE_LABELS,
        SECONDS_BUCKETS,
        "Discovery embedding time",
    ),
    "mcp_tool_discovery_search_duration_seconds": (
        "histogram",
        "s",
        SERVICE_LABELS,
        SECONDS_BUCKETS,
        "Discovery index search time",
    ),
    "mcp_tool_discovery_results": (
        "histogram",
        "",
        SERVICE_LABELS,
        RESULTS_BUCKETS,
        "Results returned per discovery",
    ),
    "mcp_protocol_latency_seconds": (
        "histogram",
        "s",
        PROTOCOL_LABELS,
        SECONDS_BUCKETS,
        "Time between MCP protocol steps",
    ),
    # The OpenTelemetry MCP semantic conventions (status Development), dotted as over OTLP;
    # Prometheus shows mcp_server_operation_duration_seconds{mcp_method_name=...}.
    "mcp.server.operation.duration": (
        "histogram",
        "s",
        SEMCONV_LABELS,
        SEMCONV_BUCKETS,
        "MCP request or notification duration as observed on the receiver from the time it was "
        "received until the result or ack is sent.",
    ),
    "mcp.client.operation.duration": (
        "histogram",
        "s",
        SEMCONV_LABELS,
        SEMCONV_BUCKETS,
        "The duration of the MCP request or notification as observed on the sender from the "
        "time it was sent until the response or ack is received.",
    ),
    "metrics_service_metrics_accepted": ("counter", "", ("type",), (), "Metrics stored"),
    "metrics_service_metrics_rejected": (
        "counter",
        "",
        ("reason",),
        (),
        "Metrics rejected, by the rule they broke",
    ),
    "metrics_service_requests": ("counter", "", ("status",), (), "Ingest requests by HTTP status"),
    "metrics_service_rate_limited_requests": (
        "counter",
        "",
        (),
        (),
        "Ingest requests refused by the rate limit",
    ),
    "metrics_service_auth_failures": ("counter", "", ("reason",), (), "Failed authentications"),
    "metrics_service_commit_failures": ("counter", "", (), (), "Failed commit attempts"),
    "metrics_service_retention_deleted_rows": (
        "counter",
        "",
        ("table",),
        (),
        "Rows deleted by retention",
    ),
    "metrics_service_export_failures": ("counter", "", ("exporter",), (), "Failed OTLP exports"),
    "metrics_service_otlp_spans": (
        "counter",
        "",
        ("outcome",),
        (),
        "Spans received on /v1/traces: accepted (MCP, stored), rejected, not_mcp (dropped)",
    ),
    "metrics_service_commit_batch_metrics": (
        "histogram",
        "",
        (),
        BATCH_BUCKETS,
        "Metrics per commit",
    ),
    "metrics_service_commit_duration_seconds": (
        "histogram",
        "s",
        (),
        SECONDS_BUCKETS,
        "Commit duration",
    ),
}


#: The two name sets a setting can switch off: the architecture document's and the semconv's.
SEMCONV_NAMES = frozenset(name for name in INSTRUMENTS if "." in name)
SEED_NAMES = frozenset(n for n in INSTRUMENTS if n.startswith("mcp_") and n not in SEMCONV_NAMES)


class _Bulk(float):
    """A histogram measurement that carries a whole commit's bucket counts; its float value is
    the sum of the values (so the SDK's finite/non-negative checks see the real sum)."""

    __slots__ = ("counts", "high", "low")
    counts: list[int]
    low: float
    high: float


class _BulkAggregation(_ExplicitBucketHistogramAggregation):
    def aggregate(self, measurement: Any, should_sample_exemplar: bool = True) -> None:
        bulk = measurement.value
        if type(bulk) is not _Bulk:
            super().aggregate(measurement, should_sample_exemplar)
            return
        with self._lock:
            # The SDK declares these private fields by their initial values (None, int).
            if self._value is None:
                self._value = self._get_empty_bucket_counts()  # type: ignore[assignment]
            self._sum += float(bulk)  # type: ignore[assignment]
            if self._record_min_max:
                self._min = min(self._min, bulk.low)
                self._max = max(self._max, bulk.high)
            value: list[int] = self._value  # type: ignore[assignment]
            for i, n in enumerate(bulk.counts):
                if n:
                    value[i] += n


class BulkHistogramAggregation(ExplicitBucketHistogramAggregation):
    """Explicit buckets that also accept ``_Bulk`` measurements."""

    def _create_aggregation(self, *args: Any, **kwargs: Any) -> Any:
        aggregation = super()._create_aggregation(*args, **kwargs)
        if type(aggregation) is _ExplicitBucketHistogramAggregation:
            aggregation.__class__ = _BulkAggregation
        return aggregation


def _bulk_works() -> bool:
    """Prove the bulk path against the installed SDK: one bulk == the same values one by one."""
    try:
        reader = InMemoryMetricReader()
        provider = MeterProvider(
            metric_readers=[reader],
            views=[View(instrument_name="h", aggregation=BulkHistogramAggregation((1.0, 2.0)))],
        )
        bulk = _Bulk(0.5 + 1.75)
        bulk.counts, bulk.low, bulk.high = [1, 1, 0], 0.5, 1.75
        provider.get_meter("t").create_histogram("h").record(bulk, {"a": "b"})
        data = reader.get_metrics_data()
        provider.shutdown()
        assert data is not None
        point = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]
        return bool(
            isinstance(point, HistogramDataPoint)
            and list(point.bucket_counts) == [1, 1, 0]
            and point.count == 2
            and point.min == 0.5
            and point.max == 1.75
        )
    except Exception:
        log.exception("bulk histogram self-test failed")
        return False


#: The longest that histogram values wait for the SDK when no reader collects.
HAND_OVER_S = 1.0


class _Hist:
    """Per-commit accumulation of one histogram: label tuple -> [counts, sum, min, max]."""

    __slots__ = ("bounds", "groups", "keep_values")

    def __init__(self, bounds: Sequence[float], keep_values: bool) -> None:
        self.bounds = bounds
        self.groups: dict[tuple[str, ...], list[Any]] = {}
        self.keep_values = keep_values  # only for the one-record-per-value fallback

    def add(self, key: tuple[str, ...], value: float) -> None:
        self.add_all(key, [value])

    def add_all(self, key: tuple[str, ...], values: list[float]) -> None:
        """``add`` for each of ``values`` (not empty), with one lookup of the group."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = [[0] * (len(self.bounds) + 1), 0.0, values[0], values[0], []]
        counts, bounds = group[0], self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        group[1] += sum(values)
        group[2] = min(group[2], min(values))
        group[3] = max(group[3], max(values))
        if self.keep_values:
            group[4].extend(values)


class _Totals:
    """Running totals of a counter, capped at ``limit`` label sets (then one overflow series)."""

    def __init__(self, labels: tuple[str, ...], limit: int) -> None:
        self.labels = labels
        self.limit = limit
        self.values: dict[tuple[Any, ...], float] = {}
        self.overflow = 0.0

    def add(self, key: tuple[Any, ...], amount: float) -> None:
        # Called on the event loop only; ``observe`` runs on an exporter thread and copies the
        # dict in one C call (atomic under the GIL).
        values = self.values
        if key in values:
            values[key] += amount
        elif len(values) < self.limit:  # as the SDK: the overflow series comes on top
            values[key] = amount
        else:
            self.overflow += amount

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        labels = self.labels
        for key, value in list(self.values.items()):
            yield Observation(value, dict(zip(labels, key, strict=True)))
        if self.overflow:
            yield Observation(self.overflow, OVERFLOW)


class _CountingExporter(MetricExporter):
    """Wraps an OTLP exporter to count and log (once per outage) failed exports."""

    def __init__(self, inner: MetricExporter, on_failure: Callable[[], None]) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._on_failure = on_failure
        self._failing = False

    def export(
        self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            if self._failing:
                log.info("OTLP export works again")
            self._failing = False
        else:
            self._on_failure()
            if not self._failing:
                log.warning(
                    "OTLP export failed; counting failures in metrics_service_export_failures_total"
                )
            self._failing = True
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


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
    """The app's MeterProvider, its readers and the per-commit recording."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue_depth: Callable[[], int] = lambda: 0,
        extra_readers: Sequence[MetricReader] = (),
    ) -> None:
        from prometheus_client import CollectorRegistry

        self._settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self._http: Any = None
        self.prometheus_port: int | None = None
        readers: list[MetricReader] = list(extra_readers)
        if settings.otel_prometheus_enabled:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            # No otel_scope_* labels: one scope only, and they would lengthen every line.
            readers.append(PrometheusMetricReader(registry=self.registry, scope_info_enabled=False))
        self.otlp_enabled = bool(settings.otlp_endpoint or settings.otlp_metrics_endpoint)
        if self.otlp_enabled:
            exporter = _CountingExporter(
                _otlp_exporter(settings),
                lambda: self.add("metrics_service_export_failures", ("otlp",)),
            )
            readers.append(
                PeriodicExportingMetricReader(
                    exporter, export_interval_millis=settings.otel_export_interval_ms
                )
            )
        limit = settings.otel_cardinality_limit
        self.seed = settings.otel_seed_metrics_enabled
        self.semconv = settings.otel_semconv_metrics_enabled
        self.exported = {
            name: spec
            for name, spec in INSTRUMENTS.items()
            if (self.seed or name not in SEED_NAMES) and (self.semconv or name not in SEMCONV_NAMES)
        }
        self.bulk = _bulk_works()
        if not self.bulk:
            log.warning(
                "the installed OpenTelemetry SDK does not take bulk histogram measurements; "
                "recording each value"
            )
        views = []
        for name, (kind, _unit, _labels, buckets, _desc) in self.exported.items():
            if kind == "histogram":
                views.append(
                    View(
                        instrument_name=name,
                        aggregation=BulkHistogramAggregation(buckets),
                        aggregation_cardinality_limit=limit,
                    )
                )
            else:
                views.append(View(instrument_name=name, aggregation_cardinality_limit=limit))
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create(
                {"service.name": settings.otel_service_name, "service.version": __version__}
            ),
            views=views,
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        meter = self.provider.get_meter("metrics_service", __version__)
        self.totals: dict[str, _Totals] = {}
        self.histograms: dict[str, Any] = {}
        self.labels: dict[str, tuple[str, ...]] = {}
        for name, (kind, unit, labels, _buckets, desc) in self.exported.items():
            self.labels[name] = labels
            if kind == "counter":
                totals = self.totals[name] = _Totals(labels, limit)
                meter.create_observable_counter(
                    name, callbacks=[totals.observe], unit=unit, description=desc
                )
            else:
                self.histograms[name] = meter.create_histogram(name, unit=unit, description=desc)
        # Histogram measurements gathered since the last hand-over, per instrument; handed to the
        # SDK when a reader collects (the first callback below: the SDK runs every asynchronous
        # callback before it reads the synchronous instruments) or when they grow old or large.
        self._pending: dict[str, _Hist] = {}
        self._pending_groups_max = 4 * limit
        self._pending_since = time.monotonic()
        self._pending_lock = threading.Lock()
        meter.create_observable_gauge(
            "metrics_service_queue_depth",
            callbacks=[self._hand_over_callback, lambda _o: [Observation(queue_depth())]],
            description="Metrics waiting for a commit",
        )
        meter.create_observable_gauge(
            "metrics_service_database_size_bytes",
            callbacks=[self._db_size],
            unit="By",
            description="Size of the SQLite database file and its WAL",
        )

    def _db_size(self, _options: CallbackOptions) -> Iterable[Observation]:
        path = str(self._settings.db_path)
        for label, file in (("db", path), ("wal", f"{path}-wal")):
            try:
                size = os.stat(file).st_size
            except OSError:
                size = 0
            yield Observation(size, {"file": label})

    # -- the web of hooks the app calls --------------------------------------------------------

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
        """Account a commit: counters at once; histogram values into the pending groups, which
        reach the SDK once per collection (or every ``HAND_OVER_S``), not once per commit."""
        accepted = self.totals["metrics_service_metrics_accepted"]
        with self._pending_lock:
            hists = self._pending

            def hist(name: str) -> _Hist:
                h = hists.get(name)
                if h is None:
                    h = hists[name] = _Hist(INSTRUMENTS[name][3], not self.bulk)
                return h

            for batch in batches:
                for kind, rows in batch.rows.items():
                    accepted.add((kind,), len(rows))
                    record = _RECORDERS.get(kind)
                    if record is not None:
                        record(self, rows, hist)
            hist("metrics_service_commit_batch_metrics").add((), size)
            hist("metrics_service_commit_duration_seconds").add((), elapsed_s)
            due = (
                time.monotonic() - self._pending_since > HAND_OVER_S
                or sum(len(h.groups) for h in hists.values()) > self._pending_groups_max
            )
        if due:
            self.hand_over()

    def hand_over(self) -> None:
        """Record the pending histogram groups in the SDK (one bulk measurement per label set)."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
            self._pending_since = time.monotonic()
        self._flush(pending)

    def _hand_over_callback(self, _options: CallbackOptions) -> Iterable[Observation]:
        self.hand_over()
        return ()

    def _flush(self, hists: dict[str, _Hist]) -> None:
        for name, acc in hists.items():
            instrument = self.histograms[name]
            labels = self.labels[name]
            for key, (counts, total, low, high, values) in acc.groups.items():
                attributes = dict(zip(labels, key, strict=True))
                if self.bulk:
                    bulk = _Bulk(total)
                    bulk.counts, bulk.low, bulk.high = counts, low, high
                    instrument.record(bulk, attributes)
                else:
                    for value in values:
                        instrument.record(value, attributes)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._settings.otel_prometheus_enabled:
            return
        from prometheus_client import start_http_server

        host, port = self._settings.otel_prometheus_host, self._settings.otel_prometheus_port
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.prometheus_port = self._http.server_port
        log.info("Prometheus endpoint on http://%s:%d/metrics", host, self.prometheus_port)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        started = time.monotonic()
        try:
            self.provider.shutdown(timeout_millis=timeout_s * 1000)
        except Exception:
            log.exception("OpenTelemetry shutdown failed")
        if self.otlp_enabled:
            log.info("OpenTelemetry stopped in %.1f s", time.monotonic() - started)


Row = tuple[Any, ...]


def _by_label(rows: list[Row], *columns: int) -> dict[Any, list[Row]]:
    """Rows grouped by the values of ``columns``. The per-label work is then done once per group
    and the per-row work is a few comprehensions: a commit holds few label sets and many rows."""
    key_of = itemgetter(*columns)
    groups: dict[Any, list[Row]] = {}
    get = groups.get
    for r in rows:
        key = key_of(r)
        group = get(key)
        if group is None:
            groups[key] = [r]
        else:
            group.append(r)
    return groups


def _labels(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple("" if v is None else v for v in values)


def _seconds(group: list[Row], i: int) -> list[float]:
    return [r[i] / 1000.0 for r in group if r[i] is not None]


def _present(group: list[Row], i: int) -> list[Any]:
    return [r[i] for r in group if r[i] is not None]


def _auth(t: Telemetry, rows: list[Row], hist: Callable[[str], _Hist]) -> None:
    if not t.seed:
        return
    c = _COL["auth_request"]
    totals = t.totals["mcp_auth_requests"]
    durations = hist("mcp_auth_request_duration_seconds")
    for (*text, success), group in _by_label(
        rows, 2, c["server"], c["method"], c["success"]
    ).items():
        key = (*_labels(text), _SUCCESS[success])
        totals.add(key, sum(r[5] for r in group))
        if values := _seconds(group, 6):
            durations.add_all(key, values)


def _tool(t: Telemetry, rows: list[Row], hist: Callable[[str], _Hist]) -> None:
    if t.semconv:
        _semconv(rows, hist)
    if not t.seed:
        return
    c = _COL["tool_execution"]
    i_in, i_out = c["input_size_bytes"], c["output_size_bytes"]
    columns = (2, c["server_name"], c["method"], c["tool_name"], c["client_name"], c["success"])
    totals = t.totals["mcp_tool_executions"]
    durations = hist("mcp_tool_execution_duration_seconds")
    inputs = hist("mcp_tool_input_size_bytes")
    outputs = hist("mcp_tool_output_size_bytes")
    for (*text, success), group in _by_label(rows, *columns).items():
        key = (*_labels(text), _SUCCESS[success])
        totals.add(key, sum(r[5] for r in group))
        if values := _seconds(group, 6):
            durations.add_all(key, values)
        if sizes := _present(group, i_in):
            inputs.add_all(key, sizes)
        if sizes := _present(group, i_out):
            outputs.add_all(key, sizes)


def _discovery(t: Telemetry, rows: list[Row], hist: Callable[[str], _Hist]) -> None:
    if not t.seed:
        return
    c = _COL["tool_discovery"]
    i_results, i_embed, i_search = c["results_count"], c["embedding_time_ms"], c["search_time_ms"]
    totals = t.totals["mcp_tool_discovery"]
    for service, group in _by_label(rows, 2).items():
        key = (service,)
        totals.add(key, sum(r[5] for r in group))
        for name, values in (
            ("mcp_tool_discovery_duration_seconds", _seconds(group, 6)),
            ("mcp_tool_discovery_embedding_duration_seconds", _seconds(group, i_embed)),
            ("mcp_tool_discovery_search_duration_seconds", _seconds(group, i_search)),
            ("mcp_tool_discovery_results", _present(group, i_results)),
        ):
            if values:
                hist(name).add_all(key, values)


def _protocol(t: Telemetry, rows: list[Row], hist: Callable[[str], _Hist]) -> None:
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


def _semconv(rows: list[Row], hist: Callable[[str], _Hist]) -> None:
    """mcp.{server,client}.operation.duration from tool_execution rows (docs/otlp.md)."""
    c = _COL["tool_execution"]
    extra = -2  # the extra-dimensions JSON, second to last in every row
    client = [r for r in rows if r[extra] is not None and _CLIENT_MARK in r[extra]]
    server = (
        [r for r in rows if r[extra] is None or _CLIENT_MARK not in r[extra]] if client else rows
    )
    columns = (
        2,
        c["method"],
        c["tool_name"],
        c["success"],
        c["error_type"],
        c["transport"],
        c["protocol_version"],
    )
    for name, part in (
        ("mcp.server.operation.duration", server),
        ("mcp.client.operation.duration", client),
    ):
        if not part:
            continue
        durations = hist(name)
        for (service, method, tool, success, error, transport, version), group in _by_label(
            part, *columns
        ).items():
            values = _seconds(group, 6)
            if not values:
                continue
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


_RECORDERS: dict[str, Callable[[Telemetry, list[Row], Callable[[str], _Hist]], None]] = {
    "auth_request": _auth,
    "tool_execution": _tool,
    "tool_discovery": _discovery,
    "protocol_latency": _protocol,
}

__all__ = ["BYTES_BUCKETS", "INSTRUMENTS", "SECONDS_BUCKETS", "SEMCONV_BUCKETS", "Telemetry"]
