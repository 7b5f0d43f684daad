"""``Telemetry.on_commit`` records exactly what a plain reference records: for random commits of
every recorded metric type, the same series in the same order, the same counts, bucket counts,
sums, minima and maxima, bit for bit, up to and past the cardinality limit.

The reference is the recording as first written (a Python loop per row and per value): rows
grouped per raw label values, each group added once, in the order the groups first appear."""

from __future__ import annotations

import json
import sys
from bisect import bisect_left
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics_service.settings import BoolLabels, Settings
from metrics_service.storage import schema
from metrics_service.telemetry import INSTRUMENTS, OVERFLOW, Telemetry
from metrics_service.validation import Batch, Validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _workload import bodies

Row = tuple[Any, ...]
VALIDATOR = Validator(Settings(db_path=Path("unused.db")))
_COL = {kind: schema.row_positions(kind) for kind in schema.DIMENSIONS}
_CLIENT_MARK = '"span_kind":"client"'
_TRANSPORT = {"stdio": "pipe", "streamable-http": "tcp", "sse": "tcp", "websocket": "tcp"}
#: What ``on_commit`` writes; the other instruments are fed elsewhere.
RECORDED = frozenset(name for name in INSTRUMENTS if name.startswith("mcp")) | {
    "metrics_service_metrics_accepted",
    "metrics_service_commit_batch_metrics",
    "metrics_service_commit_duration_seconds",
}


class Reference:
    """The instruments ``on_commit`` feeds, recorded one row and one value at a time."""

    def __init__(self, s: Settings) -> None:
        self.limit = s.otel_cardinality_limit
        self.seed = s.otel_seed_metrics_enabled
        self.semconv = s.otel_semconv_metrics_enabled
        capitalized = s.otel_bool_labels is BoolLabels.capitalized
        self.success: dict[Any, str] = {
            1: "True" if capitalized else "true",
            0: "False" if capitalized else "false",
            None: "unknown",
        }
        self.series: dict[str, dict[tuple[Any, ...], Any]] = {n: {} for n in RECORDED}
        self.overflow: dict[str, Any] = {}

    # -- instruments ---------------------------------------------------------------------------

    def add(self, name: str, key: tuple[Any, ...], amount: float) -> None:
        series = self.series[name]
        if key in series:
            series[key] += amount
        elif len(series) < self.limit:
            series[key] = amount
        else:
            self.overflow[name] = self.overflow.get(name, 0) + amount

    def record(self, name: str, key: tuple[Any, ...], values: list[Any]) -> None:
        series = self.series[name]
        point = series.get(key)
        if point is None:
            n = len(INSTRUMENTS[name].buckets) + 1
            if len(series) < self.limit:
                point = series[key] = [[0] * n, 0, 0.0, values[0], values[0]]
            else:
                point = self.overflow.get(name) or [[0] * n, 0, 0.0, values[0], values[0]]
                self.overflow[name] = point
        for value in values:
            point[0][bisect_left(INSTRUMENTS[name].buckets, value)] += 1
        point[1] += len(values)
        point[2] += sum(values)
        point[3] = min(point[3], min(values))
        point[4] = max(point[4], max(values))

    # -- recording -----------------------------------------------------------------------------

    def on_commit(self, batches: Sequence[Batch], size: int, elapsed_s: float) -> None:
        by_kind: dict[str, list[Row]] = {}
        for batch in batches:
            for kind, rows in batch.rows.items():
                by_kind.setdefault(kind, []).extend(rows)
        for kind, rows in by_kind.items():
            self.add("metrics_service_metrics_accepted", (kind,), len(rows))
            recorder: Callable[[list[Row]], None] | None = getattr(self, kind, None)
            if recorder is not None and kind != "custom":
                recorder(rows)
        self.record("metrics_service_commit_batch_metrics", (), [size])
        self.record("metrics_service_commit_duration_seconds", (), [elapsed_s])

    def auth_request(self, rows: list[Row]) -> None:
        if not self.seed:
            return
        c = _COL["auth_request"]
        for (*text, success), group in _groups(rows, 2, c["server"], c["method"], c["success"]):
            key = (*_text(text), self.success[success])
            self.add("mcp_auth_requests", key, sum(r[5] for r in group))
            if values := _seconds(group, 6):
                self.record("mcp_auth_request_duration_seconds", key, values)

    def tool_execution(self, rows: list[Row]) -> None:
        c = _COL["tool_execution"]
        if self.semconv:
            self.semantic_conventions(rows)
        if not self.seed:
            return
        columns = (2, c["server_name"], c["method"], c["tool_name"], c["client_name"], c["success"])
        for (*text, success), group in _groups(rows, *columns):
            key = (*_text(text), self.success[success])
            self.add("mcp_tool_executions", key, sum(r[5] for r in group))
            if values := _seconds(group, 6):
                self.record("mcp_tool_execution_duration_seconds", key, values)
            if sizes := _present(group, c["input_size_bytes"]):
                self.record("mcp_tool_input_size_bytes", key, sizes)
            if sizes := _present(group, c["output_size_bytes"]):
                self.record("mcp_tool_output_size_bytes", key, sizes)

    def semantic_conventions(self, rows: list[Row]) -> None:
        c = _COL["tool_execution"]
        client = [r for r in rows if r[-2] is not None and _CLIENT_MARK in r[-2]]
        server = [r for r in rows if r[-2] is None or _CLIENT_MARK not in r[-2]]
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
            for (service, method, tool, success, error, transport, version), group in _groups(
                part, *columns
            ):
                values = _seconds(group, 6)
                if not values:
                    continue
                code = error if error is not None and error.lstrip("-").isdigit() else None
                key = (
                    service,
                    method or "",
                    tool or "",
                    "execute_tool" if method == "tools/call" else "",
                    (error or "_OTHER") if success == 0 else "",
                    code or "",
                    _TRANSPORT.get(transport, transport) or "",
                    version or "",
                )
                self.record(name, key, values)

    def tool_discovery(self, rows: list[Row]) -> None:
        if not self.seed:
            return
        c = _COL["tool_discovery"]
        for (service,), group in _groups(rows, 2):
            key = (service,)
            self.add("mcp_tool_discovery", key, sum(r[5] for r in group))
            for name, values in (
                ("mcp_tool_discovery_duration_seconds", _seconds(group, 6)),
                (
                    "mcp_tool_discovery_embedding_duration_seconds",
                    _seconds(group, c["embedding_time_ms"]),
                ),
                (
                    "mcp_tool_discovery_search_duration_seconds",
                    _seconds(group, c["search_time_ms"]),
                ),
                ("mcp_tool_discovery_results", _present(group, c["results_count"])),
            ):
                if values:
                    self.record(name, key, values)

    def protocol_latency(self, rows: list[Row]) -> None:
        if not self.seed:
            return
        c = _COL["protocol_latency"]
        for text, group in _groups(rows, 2, c["server_name"], c["client_name"], c["flow_step"]):
            if values := _seconds(group, 6):
                self.record("mcp_protocol_latency_seconds", _text(text), values)

    def health_check(self, rows: list[Row]) -> None:
        if not self.seed:
            return
        c = _COL["health_check"]
        columns = (2, c["server_name"], c["endpoint"], c["status_code"], c["healthy"])
        for (service, server, endpoint, status, healthy), group in _groups(rows, *columns):
            code = "" if status is None else str(status)
            key = (service, server or "", endpoint or "", code, self.success[healthy])
            self.add("mcp_health_checks", key, sum(r[5] for r in group))
            if values := _seconds(group, 6):
                self.record("mcp_health_check_duration_seconds", key, values)

    # -- export --------------------------------------------------------------------------------

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        labels = INSTRUMENTS[name].labels
        points = [(dict(zip(labels, k, strict=True)), v) for k, v in self.series[name].items()]
        if name in self.overflow:
            points.append((OVERFLOW, self.overflow[name]))
        return [(a, _exact(v)) for a, v in points]


def _groups(rows: list[Row], *columns: int) -> list[tuple[tuple[Any, ...], list[Row]]]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r[i] for i in columns), []).append(r)
    return list(groups.items())


def _text(values: Sequence[str | None]) -> tuple[str, ...]:
    return tuple("" if v is None else v for v in values)


def _seconds(group: list[Row], i: int) -> list[float]:
    return [r[i] / 1000.0 for r in group if r[i] is not None]


def _present(group: list[Row], i: int) -> list[Any]:
    return [r[i] for r in group if r[i] is not None]


def _exact(value: Any) -> Any:
    """A value compared bit for bit: floats by their hex form, ints as ints (types differ)."""
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, list):  # a reference histogram point
        counts, count, total, low, high = value
        return (tuple(counts), count, _exact(total), _exact(low), _exact(high))
    if hasattr(value, "counts"):  # an exported histogram point
        return (tuple(value.counts), value.count, *map(_exact, (value.sum, value.min, value.max)))
    return (type(value).__name__, value)


def exported(t: Telemetry) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    return {
        name: [(a, _exact(v)) for a, v in points]
        for name, _, points in t.snapshot()
        if name in RECORDED
    }


def expected(r: Reference, t: Telemetry) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    out = {name: r.points(name) for name in t.exported if name in RECORDED}
    return {name: points for name, points in out.items() if points}


# -- random commits ------------------------------------------------------------------------------


def optional(values: Sequence[Any]) -> st.SearchStrategy[Any]:
    """One of ``values``, or absent (``None`` drops the dimension)."""
    return st.sampled_from([None, *values])


def mostly(values: Sequence[Any]) -> st.SearchStrategy[Any]:
    """Usually the first of ``values`` (so that rows share label sets), else ``optional``."""
    return st.one_of(st.just(values[0]), st.just(values[0]), optional(values))


#: Milliseconds, bucket bounds among them (a value on a bound counts in that bound's bucket).
durations = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.5, 10.0, 100.0, 250.0, 1000.0, 60_000.0, 300_000.0]),
    st.floats(min_value=0, max_value=86_400_000.0, allow_nan=False),
    st.integers(min_value=0, max_value=400_000),
)
sizes = st.one_of(st.sampled_from([0, 64, 65, 1024, 16_777_216]), st.integers(0, 20_000_000))
values = st.sampled_from([1, 1, 1, 0.1, 0.2, 3, 2.5, 1e-3, 7e12])
services = st.sampled_from(["svc", "svc", "other"])
texts = ["a", "b", ""]  # "" and absent are different raw values with the same label


def _metric(kind: str, duration: Any, value: Any, dimensions: dict[str, Any]) -> dict[str, Any]:
    dims = {k: v for k, v in dimensions.items() if v is not None}
    m: dict[str, Any] = {"type": kind, "dimensions": dims}
    if duration is not None:
        m["duration_ms"] = duration
    if value is not None:
        m["value"] = value
    return m


def metrics() -> st.SearchStrategy[dict[str, Any]]:
    common = {"duration": st.one_of(st.none(), durations), "value": st.one_of(st.none(), values)}
    auth = st.fixed_dictionaries(
        {
            "success": st.booleans(),
            "method": mostly(["jwt", "oauth", ""]),
            "server": mostly(texts),
        }
    )
    tool = st.fixed_dictionaries(
        {
            "method": st.sampled_from(["tools/call", "tools/call", "tools/list", "initialize"]),
            "tool_name": mostly(["search", "read", "tools/list", ""]),
            "server_name": mostly(texts),
            "client_name": mostly(["claude", ""]),
            "success": st.booleans(),
            "input_size_bytes": st.one_of(st.none(), sizes),
            "output_size_bytes": st.one_of(st.none(), sizes),
            "transport": optional(["stdio", "sse", "tcp", "pipe", "streamable-http", ""]),
            "protocol_version": optional(["2025-06-18", ""]),
            "error_type": optional(["-32602", "tool_error", "ValueError", "-", ""]),
            "span_kind": optional(["client", "server"]),
            "note": optional(["x", 'say "span_kind":"client"']),
        }
    )
    discovery = st.fixed_dictionaries(
        {
            "query": optional(["q1", "q2"]),
            "results_count": st.one_of(st.none(), st.integers(-1, 150)),
            "embedding_time_ms": st.one_of(st.none(), durations),
            "search_time_ms": st.one_of(st.none(), durations),
        }
    )
    protocol = st.fixed_dictionaries(
        {
            "flow_step": st.sampled_from(["initialize->tools/list", "tools/list->tools/call"]),
            "server_name": mostly(texts),
            "client_name": optional(["claude"]),
        }
    )
    health = st.fixed_dictionaries(
        {
            "endpoint": mostly(["/health", ""]),
            "status_code": st.one_of(st.none(), st.sampled_from([200, 503])),
            "healthy": st.one_of(st.none(), st.booleans()),
            "server_name": optional(texts),
        }
    )
    kinds = {
        "auth_request": auth,
        "tool_execution": tool,
        "tool_discovery": discovery,
        "protocol_latency": protocol,
        "health_check": health,
        "custom": st.just({}),
    }
    return st.one_of(
        *(
            st.builds(_metric, st.just(kind), dimensions=dims, **common)
            for kind, dims in kinds.items()
        )
    )


def _body(service: str, items: list[dict[str, Any]]) -> Batch:
    body = json.dumps({"service": service, "version": "1.0.0", "metrics": items}).encode()
    return VALIDATOR.decode(body)


batches = st.builds(_body, services, st.lists(metrics(), min_size=10, max_size=100))
commits = st.lists(st.lists(batches, min_size=1, max_size=4), min_size=1, max_size=5)
configs = st.fixed_dictionaries(
    {
        "otel_cardinality_limit": st.sampled_from([10, 12, 500]),
        "otel_bool_labels": st.sampled_from(list(BoolLabels)),
        "otel_seed_metrics_enabled": st.booleans(),
        "otel_semconv_metrics_enabled": st.booleans(),
    }
)


def _check(config: dict[str, Any], commits: list[list[Batch]]) -> None:
    s = Settings(db_path=Path("unused.db"), otel_prometheus_enabled=False, **config)
    telemetry, reference = Telemetry(s), Reference(s)
    for n, batches in enumerate(commits):
        size = sum(b.accepted for b in batches)
        telemetry.on_commit(batches, size, n * 0.37)
        reference.on_commit(batches, size, n * 0.37)
        assert exported(telemetry) == expected(reference, telemetry)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, commits)
def test_commits_are_recorded_as_the_reference_records_them(
    config: dict[str, Any], commits: list[list[Batch]]
) -> None:
    _check(config, commits)


def _tool_row(
    tool: str, success: bool, duration: float, extra: dict[str, str | None]
) -> dict[str, Any]:
    dims = {"method": "tools/call", "tool_name": tool, "success": success, "server_name": "s"}
    dims.update({k: v for k, v in extra.items() if v is not None})
    return {"type": "tool_execution", "duration_ms": duration, "dimensions": dims}


#: Tool rows of few seed label sets, told apart only by the columns the conventions add (and
#: the client mark): each seed series then takes rows of many groups, interleaved.
interleaved = st.lists(
    st.builds(
        _tool_row,
        st.sampled_from(["search", "read"]),
        st.booleans(),
        st.floats(min_value=0, max_value=100_000, allow_nan=False),
        st.fixed_dictionaries(
            {
                "error_type": optional(["-32602", "tool_error"]),
                "transport": optional(["stdio", "pipe"]),
                "protocol_version": optional(["2025-06-18"]),
                "span_kind": optional(["client"]),
                "input_size_bytes": st.one_of(st.none(), sizes),
            }
        ),
    ),
    min_size=2,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([10, 500]), st.lists(interleaved, min_size=1, max_size=3))
def test_a_series_of_many_groups_takes_their_values_in_row_order(
    limit: int, commits: list[list[dict[str, Any]]]
) -> None:
    _check({"otel_cardinality_limit": limit}, [[_body("svc", items)] for items in commits])


@given(st.sampled_from([10, 500]), st.integers(1, 6))
@settings(max_examples=6, deadline=None)
def test_the_bench_mix_is_recorded_as_the_reference_records_it(limit: int, group: int) -> None:
    """Large commits of many rows per label set (the bench's), which random commits rarely build."""
    decoded = [VALIDATOR.decode(b) for b in bodies(24, 100, service="svc")]
    decoded += [VALIDATOR.decode(b) for b in bodies(4, 100, service=f"svc-{limit}")]
    commits = [decoded[i : i + group] for i in range(0, len(decoded), group)]
    _check({"otel_cardinality_limit": limit}, commits)
