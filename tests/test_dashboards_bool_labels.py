"""Our dashboards and alert expressions with ``METRICS_OTEL_BOOL_LABELS=capitalized``: a
deployment that switches the spelling for the reference's dashboard keeps ours working. A real
Prometheus scrapes a real service in that mode; every panel query of the analytics dashboard
returns data, and the failure queries and alert ratios see the failures that were sent
(``tests/test_dashboards.py`` proves the default mode with the full traffic)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests._helpers import payload
from tests._prometheus import ScrapedService, scraped_service
from tests._traffic import auth, discovery, health, protocol, tool
from tests.test_dashboards import (
    ANALYTICS,
    BOOL_MATCHER,
    HEALTH,
    RULES,
    SEMCONV,
    _scraped_after,
    load,
    substitute,
    targets,
)

KEY = "gateway-eu-key-0123456789abcdef"
ALL = {"service": ".*", "server": ".*", "method": ".*"}
EVENTS = [
    auth(True, "jwt", "github", 8),
    auth(False, "oauth", "github", 300),
    tool("search_code", "tools/call", "github", "cursor", duration_ms=35),
    tool("search_code", "tools/call", "github", "cursor", False, 2500),
    tool(None, "initialize", "github", "cursor", duration_ms=4),
    tool(None, "tools/list", "github", "cursor", duration_ms=9),
    protocol("initialize->tools/list", 120, "github", "cursor"),
    discovery("read a file", 12, 55, 40, 9),
    health("github", duration_ms=6),
    health("github", False, 503, 1800),
]


@pytest.fixture(scope="module")
def capitalized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapedService]:
    env = {"METRICS_API_KEY_GATEWAY_EU": KEY, "METRICS_OTEL_BOOL_LABELS": "capitalized"}
    with (
        scraped_service(tmp_path_factory.mktemp("capitalized"), env) as s,
        httpx.Client(base_url=s.service.url, timeout=30) as client,
    ):
        for _ in range(2):  # two scrapes after traffic: rates and quantiles are defined
            r = client.post(
                "/metrics", json=payload("gateway-eu", EVENTS), headers={"X-API-Key": KEY}
            )
            assert r.status_code == 200 and r.json()["accepted"] == len(EVENTS), r.text
            _scraped_after(s.prom, time.time())
        yield s


def test_the_service_really_exports_capitalized_labels(capitalized: ScrapedService) -> None:
    values = {
        r["metric"]["success"] for r in capitalized.prom.query("mcp_tool_executions_total")
    } | {r["metric"]["healthy"] for r in capitalized.prom.query("mcp_health_checks_total")}
    assert values == {"True", "False"}


def test_every_panel_query_returns_data(capitalized: ScrapedService) -> None:
    """The analytics dashboard, the one with boolean labels (the other two have none)."""
    assert all(
        BOOL_MATCHER.search(e) is None for n in (HEALTH, SEMCONV) for _, e in targets(load(n))
    )
    empty = [
        where
        for where, expr in targets(load(ANALYTICS))
        if not any(math.isfinite(v) for v in capitalized.prom.values(substitute(expr, ALL)))
    ]
    assert not empty, empty


def test_failure_queries_count_the_failures(capitalized: ScrapedService) -> None:
    """Every query that selects failures sees the ones sent (none would be 0: or vector(0))."""
    failures = {
        where: capitalized.prom.values(substitute(expr, ALL))
        for where, expr in targets(load(ANALYTICS))
        if '"false|False"' in expr
    }
    assert len(failures) >= 5, failures
    assert all(values and max(values) > 0 for values in failures.values()), failures


def test_alert_expressions_see_the_failures(capitalized: ScrapedService) -> None:
    """The failure ratios of MCPAuthFailureSpike and MCPServerUnhealthy, evaluated as written
    (without their thresholds) on the capitalized series."""
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}  # fmt: skip
    for alert in ("MCPAuthFailureSpike", "MCPServerUnhealthy"):
        ratio = rules[alert].split(") >")[0].strip().removeprefix("(")
        values = capitalized.prom.values(ratio)
        assert values and all(v == pytest.approx(0.5, abs=0.01) for v in values), (alert, values)
