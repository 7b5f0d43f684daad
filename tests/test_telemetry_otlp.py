"""OTLP export through a real collector (rotel) to a receiver that decodes with opentelemetry-proto;
an unreachable collector neither slows nor blocks ingest, and is counted."""

from __future__ import annotations

import bisect
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpExporter,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests._helpers import ServiceProcess, db_rows, free_port, listening_ports, wait_for
from tests._otlp import OtlpReceiver, start_rotel
from tests._prometheus import parse_samples, scrape, total
from tests._traffic import auth, discovery, health, post_all, protocol, tool

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BYTES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
RESULTS = (0, 1, 2, 5, 10, 20, 50, 100)

AUTH_JWT = {"service": "svc", "server": "auth-1", "method": "jwt", "success": "true"}
AUTH_OAUTH = {**AUTH_JWT, "method": "oauth", "success": "false"}
AUTH_NOAUTH = {**AUTH_JWT, "method": "noauth"}
SEARCH = {
    "service": "svc",
    "server_name": "srv",
    "method": "tools/call",
    "tool_name": "search",
    "client_name": "claude",
    "success": "true",
}
LIST = {**SEARCH, "method": "tools/list", "tool_name": ""}
SVC = {"service": "svc"}
STEP = {
    "service": "svc",
    "server_name": "srv",
    "client_name": "claude",
    "flow_step": "initialize->tools/list",
}
HEALTHY = {
    "service": "svc",
    "server_name": "srv",
    "endpoint": "/health/srv",
    "status_code": "200",
    "healthy": "true",
}
UNHEALTHY = {**HEALTHY, "status_code": "503", "healthy": "false"}
#: No status code (the server did not answer): an empty attribute, like tool_name of LIST.
UNREACHABLE = {**HEALTHY, "status_code": "", "healthy": "false"}

TRAFFIC = [
    auth(True, "jwt", duration_ms=5, user_hash="a"),
    auth(True, "jwt", duration_ms=20, user_hash="b"),
    auth(True, "jwt", duration_ms=80, user_hash="c"),
    auth(False, "oauth", duration_ms=300, user_hash="d"),
    auth(True, "noauth", duration_ms=None, value=3),  # counters add `value`
    tool("search", duration_ms=30, input_size=100, output_size=5000),
    tool("search", duration_ms=600, input_size=2000, output_size=70000, session_id="s2"),
    tool(None, method="tools/list", duration_ms=2, input_size=0, output_size=300),
    discovery("q1", results=7, duration_ms=20, embedding_ms=12, search_ms=3),
    discovery("q2", results=0, duration_ms=40, embedding_ms=30, search_ms=6),
    protocol("initialize->tools/list", duration_ms=15),
    protocol("initialize->tools/list", duration_ms=150, session_id="s2"),
    health(duration_ms=4),
    health(duration_ms=40),
    health(healthy=False, status_code=503, duration_ms=2000),
    health(healthy=False, status_code=None, duration_ms=None, value=2),  # unreachable
]


def _hist(values: list[float], bounds: tuple[float, ...]) -> tuple[int, float, tuple[int, ...]]:
    """(count, sum, bucket counts) as explicit buckets hold them (bucket i: <= bound i)."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    return len(values), round(sum(values), 9), tuple(counts)


def _key(attrs: dict[str, str]) -> frozenset[tuple[str, Any]]:
    return frozenset(attrs.items())


#: metric -> attribute set -> counter total, or (count, sum, bucket counts) of a histogram.
EXPECTED: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {
    "mcp_auth_requests": {_key(AUTH_JWT): 3, _key(AUTH_OAUTH): 1, _key(AUTH_NOAUTH): 3},
    "mcp_auth_request_duration_seconds": {
        _key(AUTH_JWT): _hist([0.005, 0.02, 0.08], SECONDS),
        _key(AUTH_OAUTH): _hist([0.3], SECONDS),
    },
    "mcp_tool_executions": {_key(SEARCH): 2, _key(LIST): 1},
    "mcp_tool_execution_duration_seconds": {
        _key(SEARCH): _hist([0.03, 0.6], SECONDS),
        _key(LIST): _hist([0.002], SECONDS),
    },
    "mcp_tool_input_size_bytes": {
        _key(SEARCH): _hist([100, 2000], BYTES),
        _key(LIST): _hist([0], BYTES),
    },
    "mcp_tool_output_size_bytes": {
        _key(SEARCH): _hist([5000, 70000], BYTES),
        _key(LIST): _hist([300], BYTES),
    },
    "mcp_tool_discovery": {_key(SVC): 2},
    "mcp_tool_discovery_duration_seconds": {_key(SVC): _hist([0.02, 0.04], SECONDS)},
    "mcp_tool_discovery_embedding_duration_seconds": {_key(SVC): _hist([0.012, 0.03], SECONDS)},
    "mcp_tool_discovery_search_duration_seconds": {_key(SVC): _hist([0.003, 0.006], SECONDS)},
    "mcp_tool_discovery_results": {_key(SVC): _hist([7, 0], RESULTS)},
    "mcp_protocol_latency_seconds": {_key(STEP): _hist([0.015, 0.15], SECONDS)},
    "mcp_health_checks": {_key(HEALTHY): 2, _key(UNHEALTHY): 1, _key(UNREACHABLE): 2},
    "mcp_health_check_duration_seconds": {
        _key(HEALTHY): _hist([0.004, 0.04], SECONDS),
        _key(UNHEALTHY): _hist([2.0], SECONDS),
    },
}
BOUNDS = {
    name: b
    for names, b in (
        ({n for n in EXPECTED if n.endswith("_seconds")}, SECONDS),
        ({"mcp_tool_input_size_bytes", "mcp_tool_output_size_bytes"}, BYTES),
        ({"mcp_tool_discovery_results"}, RESULTS),
    )
    for name in names
}


def _received(receiver: OtlpReceiver, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
    """The newest value per attribute set, in the shape of EXPECTED."""
    out: dict[frozenset[tuple[str, Any]], Any] = {}
    for key, p in receiver.latest(name).items():
        if p.metric.WhichOneof("data") == "sum":
            out[key] = (
                p.point.as_double if p.point.WhichOneof("value") == "as_double" else p.point.as_int
            )
        else:
            out[key] = (p.point.count, round(p.point.sum, 9), tuple(p.point.bucket_counts))
    return out


def _mismatches(receiver: OtlpReceiver) -> dict[str, Any]:
    got = {name: _received(receiver, name) for name in EXPECTED}
    return {name: got[name] for name in EXPECTED if got[name] != EXPECTED[name]}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_rotel_relays_what_the_sdk_exporter_sends(
    tmp_path: Path, receiver: OtlpReceiver, protocol: str
) -> None:
    """The chain itself: the official exporter -> rotel (gRPC or HTTP in) -> the receiver."""
    with start_rotel(tmp_path, receiver.url) as rotel:
        if protocol == "grpc":
            exporter: Any = GrpcExporter(endpoint=rotel.grpc_endpoint, insecure=True)
        else:
            exporter = HttpExporter(endpoint=f"{rotel.http_endpoint}/v1/metrics")
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=200)
        provider = MeterProvider([reader], resource=Resource.create({"service.name": "relay"}))
        try:
            provider.get_meter("relay-test").create_counter("relayed").add(3, {"k": "v"})
            points = wait_for(lambda: receiver.latest("relayed"), 10)
        finally:
            provider.shutdown()
    [point] = points.values()
    assert point.resource["service.name"] == "relay" and point.scope == "relay-test"
    assert point.attributes == {"k": "v"} and point.point.as_int == 3
    assert receiver.refused == []


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_service_exports_otlp_through_a_collector(
    tmp_path: Path, service: ServiceProcess, receiver: OtlpReceiver, protocol: str
) -> None:
    with start_rotel(tmp_path / "rotel", receiver.url) as rotel:
        service.env.update(
            OTEL_SERVICE_NAME=f"otlp-{protocol}",
            OTEL_EXPORTER_OTLP_ENDPOINT=rotel.grpc_endpoint
            if protocol == "grpc"
            else rotel.http_endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_METRIC_EXPORT_INTERVAL="500",
            # OTLP alone: the Prometheus endpoint can be switched off.
            OTEL_PROMETHEUS_ENABLED="false",
        )
        service.start()
        assert service.proc is not None
        # No Prometheus endpoint: the API's is the only port the process listens on.
        assert listening_ports(service.proc.pid) == {service.port}
        assert service.prometheus_port is None
        with httpx.Client(base_url=service.url, timeout=30) as c:
            post_all(c, TRAFFIC)
        try:
            wait_for(lambda: not _mismatches(receiver), 20, 0.1)
        except AssertionError:
            raise AssertionError(f"received differs: {_mismatches(receiver)}") from None
        service.stop()  # while the collector is up, so that the final export is delivered

    names = receiver.names()
    assert not {n for n in names if n.endswith("_total")}, names  # OTLP names carry no _total
    assert {"metrics_service_metrics_accepted", "metrics_service_requests"} <= names
    for name in EXPECTED:
        for p in receiver.latest(name).values():
            assert p.resource["service.name"] == f"otlp-{protocol}"
            assert p.scope == "metrics_service"
            data = getattr(p.metric, p.metric.WhichOneof("data") or "")
            assert (
                data.aggregation_temporality
                == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            )
            if name in BOUNDS:
                assert tuple(p.point.explicit_bounds) == tuple(map(float, BOUNDS[name])), name
            else:
                assert p.metric.WhichOneof("data") == "sum" and data.is_monotonic, name
    accepted = _received(receiver, "metrics_service_metrics_accepted")
    assert accepted[_key({"type": "auth_request"})] == 5
    assert receiver.refused == []


def test_seed_endpoint_name_and_headers_reach_the_collector(
    service: ServiceProcess, receiver: OtlpReceiver
) -> None:
    """OTEL_OTLP_ENDPOINT (the seed's name) and OTEL_EXPORTER_OTLP_HEADERS (values URL-encoded,
    as the OpenTelemetry specification says), straight to an OTLP/HTTP backend."""
    service.env.update(
        OTEL_OTLP_ENDPOINT=receiver.url,
        OTEL_EXPORTER_OTLP_HEADERS="x-tenant=acme,authorization=Bearer%20t0k",
        OTEL_METRIC_EXPORT_INTERVAL="200",
    )
    service.start()
    with httpx.Client(base_url=service.url, timeout=30) as c:
        post_all(c, [auth()])
    wait_for(lambda: receiver.latest("mcp_auth_requests"), 10)
    headers = receiver.headers[-1]
    assert headers["x-tenant"] == "acme" and headers["authorization"] == "Bearer t0k"
    assert headers["content-type"] == "application/x-protobuf"


class _SilentCollector:
    """A port that accepts connections (kernel backlog) and never answers: a hung collector."""

    def __enter__(self) -> str:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# Both protocols and both ways of being down, without running all four pairs.
@pytest.mark.parametrize(
    ("protocol", "collector"), [("http/protobuf", "refusing"), ("grpc", "hung")]
)
def test_collector_down_does_not_slow_ingest_and_is_counted(
    service: ServiceProcess, protocol: str, collector: str
) -> None:
    export_timeout_s = 2.0
    with _SilentCollector() as hung_url:
        endpoint = hung_url if collector == "hung" else f"http://127.0.0.1:{free_port()}"
        service.env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_EXPORTER_OTLP_TIMEOUT=str(int(export_timeout_s * 1000)),
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        service.start()
        prometheus = f"http://127.0.0.1:{service.prometheus_port}"
        latencies: list[float] = []
        posted = 0

        def failures() -> float:
            return total(
                parse_samples(scrape(f"{prometheus}/metrics")),
                "metrics_service_export_failures_total",
                exporter="otlp",
            )

        # Ingest while exports fail, until a failure has been counted; a few more after that.
        with httpx.Client(base_url=service.url, timeout=30) as c:
            deadline = time.monotonic() + 30
            extra = 5
            while extra > 0 and time.monotonic() < deadline:
                started = time.perf_counter()
                post_all(c, [auth(duration_ms=float(posted + i)) for i in range(20)])
                latencies.append(time.perf_counter() - started)
                posted += 20
                if failures() > 0:
                    extra -= 1
        assert failures() > 0, service.log()[-2000:]
        # An ingest that waited for an export would take the exporter's timeout (2 s).
        assert max(latencies) < export_timeout_s / 2, sorted(latencies)[-5:]
        assert db_rows(service.db_path, "SELECT count(*) FROM auth_metrics") == [(posted,)]
        # Shutting down with the collector still down is bounded too.
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.wait(20) == 0
        assert time.monotonic() - started < 15
