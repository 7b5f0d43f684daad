"""A real Prometheus scrapes the real service: every instrument with its labels, rate() and
histogram_quantile() against known traffic, target_info, and promtool's lint of the exposition."""

from __future__ import annotations

import bisect
import math
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    ServiceProcess,
    free_port,
    payload,
    require_binary,
    wait_for,
)
from tests._prometheus import ScrapedService, parse_samples, scrape, scraped_service, total
from tests._traffic import H, auth, discovery, health, post_all, protocol, tool

SERVICE_NAME = "mcp-metrics-test"
ADMIN = {"X-API-Key": ADMIN_KEY}
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BYTES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
RESULTS = (0, 1, 2, 5, 10, 20, 50, 100)

AUTH = {"service", "server", "method", "success"}
TOOL = {"service", "server_name", "method", "tool_name", "client_name", "success"}
PROTOCOL = {"service", "server_name", "client_name", "flow_step"}
HEALTH = {"service", "server_name", "endpoint", "status_code", "healthy"}
SERVICE = {"service"}
# Added by Prometheus (job, instance) and by the OpenTelemetry exporter (instrumentation scope;
# its empty otel_scope_schema_url is dropped by Prometheus like any empty label).
INFRA = {"__name__", "job", "instance", "otel_scope_name", "otel_scope_version"}

#: Prometheus name -> (label names, bucket bounds or None for counters and gauges).
EXPECTED: dict[str, tuple[set[str], tuple[float, ...] | None]] = {
    "mcp_auth_requests_total": (AUTH, None),
    "mcp_tool_executions_total": (TOOL, None),
    "mcp_tool_discovery_total": (SERVICE, None),
    "mcp_auth_request_duration_seconds": (AUTH, SECONDS),
    "mcp_tool_execution_duration_seconds": (TOOL, SECONDS),
    "mcp_tool_discovery_duration_seconds": (SERVICE, SECONDS),
    "mcp_tool_discovery_embedding_duration_seconds": (SERVICE, SECONDS),
    "mcp_tool_discovery_search_duration_seconds": (SERVICE, SECONDS),
    "mcp_protocol_latency_seconds": (PROTOCOL, SECONDS),
    "mcp_tool_input_size_bytes": (TOOL, BYTES),
    "mcp_tool_output_size_bytes": (TOOL, BYTES),
    "mcp_tool_discovery_results": (SERVICE, RESULTS),
    "mcp_health_checks_total": (HEALTH, None),
    "mcp_health_check_duration_seconds": (HEALTH, SECONDS),
    "metrics_service_metrics_accepted_total": ({"type"}, None),
    "metrics_service_metrics_rejected_total": ({"reason"}, None),
    "metrics_service_requests_total": ({"status"}, None),
    "metrics_service_rate_limited_requests_total": (set(), None),
    "metrics_service_auth_failures_total": ({"reason"}, None),
    "metrics_service_queue_depth": (set(), None),
    "metrics_service_commit_batch_metrics": (set(), (1, 10, 100, 1000, 5000, 10000, 50000)),
    "metrics_service_commit_duration_seconds": (set(), SECONDS),
    "metrics_service_commit_failures_total": (set(), None),
    "metrics_service_retention_deleted_rows_total": ({"table"}, None),
    "metrics_service_export_failures_total": ({"exporter"}, None),
    "metrics_service_database_size_bytes": ({"file"}, None),
}


def _counted(exporter_url: str, name: str) -> float:
    """A counter's total, read straight from the service's Prometheus endpoint."""
    return total(parse_samples(scrape(exporter_url)), name)


def _cause_a_commit_failure(
    client: httpx.Client, service: ServiceProcess, exporter_url: str
) -> None:
    """Hold SQLite's write lock from outside so that the service's commit fails and is retried."""
    other = sqlite3.connect(service.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    statuses: list[int] = []
    poster = threading.Thread(
        target=lambda: statuses.append(
            client.post(
                "/metrics", json=payload(metrics=[auth(server="locked")]), headers=H
            ).status_code
        )
    )
    poster.start()
    try:
        wait_for(lambda: _counted(exporter_url, "metrics_service_commit_failures_total"), 15, 0.05)
    finally:
        other.execute("ROLLBACK")
        other.close()
        poster.join(30)
    assert statuses == [200]  # retried once the lock was gone (METRICS_COMMIT_RETRIES=100)


def _send_every_kind(service: ServiceProcess, exporter_url: str) -> None:
    """Traffic that makes every instrument, including each self-metric, record something."""
    with httpx.Client(base_url=service.url, timeout=30) as c:
        events = [
            *(auth(True, "jwt", duration_ms=ms, user_hash=f"u-{ms}") for ms in (5, 20, 80)),
            *(auth(False, "oauth", duration_ms=ms, user_hash=f"u-{ms}") for ms in (300, 700)),
            tool("search"),
            tool("search", success=False, duration_ms=4000),
            tool(None, method="tools/list"),
            discovery(),
            discovery("other query", results=0),
            protocol("initialize->tools/list"),
            protocol("tools/list->tools/call"),
            protocol("initialize->tools/call", duration_ms=900),
            health(duration_ms=4),
            health(duration_ms=40),
            health("other", healthy=False, status_code=503, duration_ms=2000),
        ]
        post_all(c, events)
        # One valid item and two invalid ones (rules "type" and "required"), then nothing valid.
        bad = [
            auth(),
            {"type": "auth_request", "dimensions": {"success": "yes"}},
            {"type": "auth_request"},
        ]
        r = c.post("/metrics", json=payload(metrics=bad), headers=H)
        assert r.status_code == 200 and r.json()["rejected"] == 2
        assert c.post("/metrics", json=payload(metrics=bad[1:]), headers=H).status_code == 422
        assert (
            c.post(
                "/metrics", json=payload(), headers={"X-API-Key": "no-such-key-0123456789"}
            ).status_code
            == 401
        )
        assert c.post("/metrics", json=payload()).status_code == 401
        # A key with a budget of one request a minute: the second request is rate limited.
        created = c.post(
            "/admin/keys", json={"service": "limited", "rate_limit_per_min": 1}, headers=ADMIN
        )
        assert created.status_code == 201
        limited = {"X-API-Key": created.json()["key"]}
        assert c.post("/metrics", json=payload("limited"), headers=limited).status_code == 200
        assert c.post("/metrics", json=payload("limited"), headers=limited).status_code == 429
        # Retention deletes one two-day-old row once the table keeps one day.
        old = auth(server="old", timestamp=time.time() - 2 * 86400)
        post_all(c, [old])
        assert (
            c.put(
                "/admin/retention/policies/auth_metrics", json={"retention_days": 1}, headers=ADMIN
            ).status_code
            == 200
        )
        done = c.post(
            "/admin/retention/cleanup",
            params={"table": "auth_metrics", "dry_run": "false"},
            headers=ADMIN,
        ).json()
        assert [t["rows"] for t in done["tables"]] == [1], done
        _cause_a_commit_failure(c, service, exporter_url)
    # The OTLP collector of this service is down; its first failed export is counted soon.
    wait_for(lambda: _counted(exporter_url, "metrics_service_export_failures_total"), 15, 0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapedService]:
    env = {
        "METRICS_API_KEY_SVC": INGEST_KEY,
        "METRICS_ADMIN_API_KEY": ADMIN_KEY,
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        # Prometheus and OTLP together (the seed's hybrid); this collector is down, so the
        # export failure counter has something to count.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "500",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        # A held write lock fails a commit within 20 ms; it is retried until the lock is gone.
        "METRICS_SQLITE_BUSY_TIMEOUT_MS": "20",
        "METRICS_COMMIT_RETRIES": "100",
        "METRICS_SQLITE_SYNCHRONOUS": "normal",
    }
    with scraped_service(tmp_path_factory.mktemp("prometheus"), env) as stack:
        _send_every_kind(stack.service, stack.exporter_url)
        yield stack


def test_prometheus_scrapes_every_instrument_with_its_labels(stack: ScrapedService) -> None:
    prom = stack.prom
    # The commit failure is the last thing the traffic caused; once scraped, everything before is.
    prom.wait_for_series("metrics_service_commit_failures_total > 0")
    prom.wait_for_series('metrics_service_export_failures_total{exporter="otlp"} > 0')
    for name, (labels, buckets) in EXPECTED.items():
        series = prom.query(f"{name}_bucket" if buckets else name)
        assert series, f"{name} not scraped"
        # Prometheus drops empty labels (tool_name of tools/list), so each series has a subset.
        seen = [set(s["metric"]) - INFRA - {"le"} for s in series]
        assert all(names <= labels for names in seen) and set().union(*seen) == labels, (name, seen)
        if buckets:
            les = {float(s["metric"]["le"]) for s in series}
            assert les == {*map(float, buckets), math.inf}, (name, sorted(les))
            assert prom.query(f"{name}_sum") and prom.query(f"{name}_count"), name

    def v(promql: str) -> float | None:
        return prom.value(promql)

    def bucket(histogram: str, matchers: str, le: float) -> float:
        """The cumulative count of one bucket, found by its bound as a number (the exporter may
        write 5 as "5" or "5.0")."""
        series = prom.query(f"sum by (le) ({histogram}_bucket{{{matchers}}})")
        [value] = [float(s["value"][1]) for s in series if float(s["metric"]["le"]) == le]
        return value

    # Values follow the traffic: counters add `value`, success is "true"/"false", durations in s.
    assert (
        v('mcp_auth_requests_total{service="svc",server="auth-1",method="jwt",success="true"}') == 4
    )
    assert v('mcp_auth_requests_total{method="oauth",success="false"}') == 2
    assert v('mcp_auth_request_duration_seconds_sum{method="oauth"}') == pytest.approx(1.0)
    assert bucket("mcp_auth_request_duration_seconds", 'method="oauth"', 0.5) == 1
    assert (
        v('mcp_tool_executions_total{tool_name="search",success="false",client_name="claude"}') == 1
    )
    assert v('mcp_tool_executions_total{method="tools/list",tool_name=""}') == 1
    assert bucket("mcp_tool_execution_duration_seconds", 'success="false"', 2.5) == 0
    assert bucket("mcp_tool_execution_duration_seconds", 'success="false"', 5) == 1
    assert bucket("mcp_tool_output_size_bytes", 'tool_name="search",success="true"', 1024) == 0
    assert bucket("mcp_tool_output_size_bytes", 'tool_name="search",success="true"', 4096) == 1
    assert v('mcp_tool_discovery_total{service="svc"}') == 2
    assert bucket("mcp_tool_discovery_results", 'service="svc"', 0) == 1
    assert v("mcp_tool_discovery_embedding_duration_seconds_sum") == pytest.approx(0.024)
    assert v("mcp_tool_discovery_search_duration_seconds_sum") == pytest.approx(0.006)
    assert (
        v(
            'mcp_protocol_latency_seconds_count{flow_step="initialize->tools/call",server_name="srv"}'
        )
        == 1
    )
    assert v('mcp_health_checks_total{server_name="srv",healthy="true",status_code="200"}') == 2
    assert v('mcp_health_checks_total{endpoint="/health/other",healthy="false"}') == 1
    assert v('mcp_health_check_duration_seconds_sum{healthy="true"}') == pytest.approx(0.044)
    assert bucket("mcp_health_check_duration_seconds", 'status_code="503"', 1) == 0
    assert bucket("mcp_health_check_duration_seconds", 'status_code="503"', 2.5) == 1
    assert {
        s["metric"]["reason"] for s in prom.query("metrics_service_metrics_rejected_total")
    } >= {"type", "required"}
    assert {s["metric"]["status"] for s in prom.query("metrics_service_requests_total")} >= {
        "200",
        "401",
        "422",
        "429",
    }
    assert {s["metric"]["file"] for s in prom.query("metrics_service_database_size_bytes > 0")} >= {
        "db"
    }
    assert v('metrics_service_retention_deleted_rows_total{table="auth_metrics"}') == 1
    assert v("metrics_service_rate_limited_requests_total") == 1
    # Never per-user, per-query or per-session labels.
    values = {
        val
        for name in EXPECTED
        for s in prom.query(f'{{__name__=~"{name}.*"}}')
        for val in s["metric"].values()
    }
    assert not values & {"u-1", "u-5", "u-20", "u-700", "find files", "other query", "sess-1"}
    # The resource, as Prometheus's info metric.
    info = prom.query(f'target_info{{service_name="{SERVICE_NAME}"}}')
    assert len(info) == 1 and info[0]["value"][1] == "1"


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[math.ceil(q * len(sorted_values)) - 1]


def _assert_in_bucket_of(
    estimate: float, true: float, bounds: tuple[float, ...], values: list[float], q: float
) -> None:
    """The estimate lies in the bucket that holds the true quantile (edges included).

    histogram_quantile interpolates inside the bucket where the cumulative count reaches q * total,
    so with exact bucket counts it always lands there. Prometheus's extrapolation of rate() scales
    all buckets alike here (see the probe below); the guard makes sure the true quantile is not so
    close to a bucket edge that a rounding of the rank could move it to the neighbour.
    """
    i = bisect.bisect_left(bounds, true)
    low, high = (bounds[i - 1] if i else 0.0), bounds[i]
    share_below = sum(x <= low for x in values) / len(values)
    share_upto = sum(x <= high for x in values) / len(values)
    assert share_below < q - 0.01 and share_upto > q + 0.01, (
        "the sample puts the quantile on a bucket edge"
    )
    assert low <= estimate <= high, (
        f"p{q * 100:g}: estimate {estimate} outside ({low}, {high}] holding {true}"
    )


def test_rate_and_histogram_quantile_match_known_traffic(stack: ScrapedService) -> None:
    prom, n = stack.prom, 2000
    rng = random.Random(20261121)
    # Log-normal latencies around 40 ms and payloads around 3 kB: skewed like real ones, and
    # spread over several buckets.
    durations_ms = [min(max(rng.lognormvariate(math.log(40), 1.0), 0.2), 50_000) for _ in range(n)]
    sizes = [int(min(rng.lognormvariate(math.log(3000), 1.2), 10_000_000)) for _ in range(n)]
    probe = "quantile-probe"
    with httpx.Client(base_url=stack.service.url, timeout=30) as c:
        # rate() only counts increases between samples, so the series must be scraped once
        # before the traffic. The probe's one value lies above the last finite bucket, so every
        # finite bucket starts at 0 and Prometheus extrapolates them all alike.
        post_all(c, [tool(probe, duration_ms=120_000, output_size=20_000_000)])
        prom.wait_for_series(
            f'mcp_tool_execution_duration_seconds_count{{tool_name="{probe}"}} == 1'
        )
        post_all(
            c,
            [
                tool(probe, duration_ms=d, output_size=s)
                for d, s in zip(durations_ms, sizes, strict=True)
            ],
        )
    prom.wait_for_series(
        f'mcp_tool_execution_duration_seconds_count{{tool_name="{probe}"}} == {n + 1}'
    )
    # A few more scrapes, so that rate()'s extrapolation (below) is a small share of the window.
    selector = f'mcp_tool_executions_total{{tool_name="{probe}"}}'
    prom.wait_for_series(f"count_over_time({selector}[1m]) >= 6")

    at = time.time()
    for metric, values, bounds in (
        ("mcp_tool_execution_duration_seconds", sorted(d / 1000 for d in durations_ms), SECONDS),
        ("mcp_tool_output_size_bytes", sorted(map(float, sizes)), BYTES),
    ):
        for q in (0.5, 0.95):
            buckets = f'rate({metric}_bucket{{tool_name="{probe}"}}[1m])'
            promql = f"histogram_quantile({q}, sum by (le) ({buckets}))"
            estimate = prom.value(promql, at)
            assert estimate is not None, promql
            _assert_in_bucket_of(estimate, _quantile(values, q), bounds, values, q)

    # rate() over the counter: the raw increase between the first and last sample is exactly n.
    # rate() * 60 s scales it by (sampled interval + extrapolation) / sampled interval, where the
    # extrapolation is at most 1.1 scrape intervals at the end and 1/n of the sampled interval at
    # the start (the counter started at 1); so it lies in [n, n * (1 + 1.2 / (samples - 1))].
    samples = prom.value(f"count_over_time({selector}[1m])", at)
    rate = prom.value(f"rate({selector}[1m])", at)
    assert samples is not None and samples >= 2 and rate is not None
    assert n <= rate * 60 <= n * (1 + 1.2 / (samples - 1)), (rate * 60, samples)


# promtool lints the exposition against Prometheus's naming and format conventions
# (https://prometheus.io/docs/practices/naming/). Nothing is allowed to be reported.
ALLOWED_LINT: set[str] = set()


def test_promtool_check_metrics_finds_nothing_to_fix(stack: ScrapedService) -> None:
    promtool = require_binary("promtool", "prometheus")
    text = scrape(stack.exporter_url)
    # All families of EXPECTED are in the text, so the lint covers every instrument.
    names = {n for n, _ in parse_samples(text)}
    assert {n for n in EXPECTED if not any(s.startswith(n) for s in names)} == set()
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    problems = {
        line
        for line in out.stdout.decode().splitlines() + out.stderr.decode().splitlines()
        if line.strip()
    }
    assert problems <= ALLOWED_LINT, problems
    assert out.returncode == 0 or problems, out
