"""100,000 distinct user hashes and query strings, and tool names far beyond the cardinality cap:
the scrape stays the same size, the overflow series takes the excess, and memory stays flat."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import httpx

from tests._helpers import ServiceProcess
from tests._prometheus import Sample, parse_samples, scrape, total
from tests._traffic import auth, discovery, post_all, tool

LIMIT = 50  # METRICS_OTEL_CARDINALITY_LIMIT for this test (default 2000)
DISTINCT = 100_000
TOOLS = 1_000
OVERFLOW = ("otel_metric_overflow", "true")
TOOL_FAMILIES = (
    "mcp_tool_executions_total",
    "mcp_tool_execution_duration_seconds_count",
    "mcp_tool_input_size_bytes_count",
    "mcp_tool_output_size_bytes_count",
    "mcp_server_operation_duration_seconds_count",  # the semconv histogram, capped the same
)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _label_sets(samples: dict[Sample, float], name: str) -> list[frozenset[tuple[str, str]]]:
    return [labels for n, labels in samples if n == name]


def test_distinct_values_do_not_grow_the_scrape_or_the_process(service: ServiceProcess) -> None:
    service.env.update(
        METRICS_OTEL_CARDINALITY_LIMIT=str(LIMIT),
        METRICS_SQLITE_SYNCHRONOUS="normal",  # durability is not under test; speed is welcome
        METRICS_RATE_LIMIT="100000",
    )
    service.start()
    assert service.proc is not None
    url = f"http://127.0.0.1:{service.prometheus_port}/metrics"

    with httpx.Client(base_url=service.url, timeout=60) as c:

        def send(users: range, tools: Iterable[int]) -> None:
            post_all(c, [auth(user_hash=f"user-{i:06d}") for i in users])
            post_all(c, [discovery(query=f"which tool reads file {i:06d}") for i in users])
            post_all(c, [tool(f"tool-{i:04d}", session_id=f"sess-{i}") for i in tools])

        # Up to the cap: one series per tool name, no overflow series.
        send(range(0, 1_000), range(LIMIT))
        at_cap = parse_samples(scrape(url))
        assert len(_label_sets(at_cap, "mcp_tool_executions_total")) == LIMIT
        assert not any(OVERFLOW in labels for _, labels in at_cap)

        # One tool name more: the overflow series appears and takes it.
        send(range(0), [LIMIT])
        text_before = scrape(url)
        before = parse_samples(text_before)
        rss_before = _rss_kib(service.proc.pid)
        for name in TOOL_FAMILIES:
            assert len(_label_sets(before, name)) == LIMIT + 1, name
            assert total(before, name, otel_metric_overflow="true") == 1, name

        # 99,000 more distinct user hashes and queries, 949 more tool names, in 1,000-item posts.
        more_tools = iter(range(LIMIT + 1, TOOLS))
        for start in range(1_000, DISTINCT, 1_000):
            send(range(start, start + 1_000), list(itertools.islice(more_tools, 10)))
        assert next(more_tools, None) is None
        text_after = scrape(url)
        after = parse_samples(text_after)
        rss_after = _rss_kib(service.proc.pid)

    # Nothing was lost: all of it is counted, the excess tool names on the overflow series.
    assert total(after, "mcp_auth_requests_total") == DISTINCT
    assert total(after, "mcp_tool_discovery_total") == DISTINCT
    assert total(after, "mcp_tool_discovery_results_count") == DISTINCT
    for name in TOOL_FAMILIES:
        assert total(after, name) == TOOLS, name
        assert total(after, name, otel_metric_overflow="true") == TOOLS - LIMIT, name
    # The same series as before the 99,000 new values: only numbers changed. Measured here at a
    # cap of 50: 3,337 samples and about 800 kB, almost all of it the 51 label sets of the five
    # tool instruments (4 histograms with 13-18 lines each, every line carrying ~10 labels);
    # the growth from the larger numbers is a few hundred bytes.
    assert set(after) == set(before)
    assert len(after) < 3_500, len(after)
    assert len(text_after) - len(text_before) < 2_000, (len(text_before), len(text_after))
    assert len(text_after) < 800_000, len(text_after)
    assert (
        "user-0" not in text_after and "which tool" not in text_after and "sess-" not in text_after
    )
    # Memory: measured 62 MB after start, 65 MB at the cap, +3.5 MB over the next 198,000 distinct
    # values (SQLite's page caches of two connections, up to 2 MB each, and allocator arenas).
    # Keeping anything per distinct value (a string and a dict slot, >= ~80 bytes) would add
    # >= 16 MB; an OpenTelemetry attribute set with its aggregation per value far more.
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 16, f"RSS {rss_before} -> {rss_after} KiB"
