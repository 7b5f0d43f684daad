"""The MCP Gateway Registry's Grafana dashboard against this service: its 35 PromQL queries
(``tests/reference_dashboard.json``, our layout of them) and its three template variables run on a
real Prometheus scraping a real service process fed by the reference clients' bodies, in both
boolean-label modes.

Measured here, and on the reference itself 32 of the 35 return data:

- ``METRICS_OTEL_BOOL_LABELS=capitalized``: the same **32 of 35**. The 4 queries grouped
  ``by (server_name)`` return one series per MCP server because tool metrics carry
  ``server_name`` (under another label name they return a single unlabelled series, the sum of
  all servers: "data", but a panel of one bar and a server count of 1; checked below).
- default (``true``/``false``, as the newer upstream exports): **23 of 35**. The 9 queries that
  filter on ``success="True"``/``"False"`` match nothing by design; written in lower case (as the
  newer upstream's dashboard has them) all 9 return data.
- never, in either mode and on the reference too: the 3 "request size quantiles", which take
  ``histogram_quantile`` of ``mcp_tool_executions_total``, a counter (no ``le`` label): Prometheus
  drops every series without ``le``, so the result is empty whatever the service exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import _reference as ref
from tests._helpers import wait_for
from tests._prometheus import ScrapedService, scraped_service

DASHBOARD = json.loads((Path(__file__).parent / "reference_dashboard.json").read_text())
QUERIES: list[str] = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
#: histogram_quantile over a counter: no data on the reference either.
NEVER = {
    i for i, q in enumerate(QUERIES) if q.startswith("histogram_quantile") and "_bucket" not in q
}
CAPITALIZED = {i for i, q in enumerate(QUERIES) if re.search(r'success="(True|False)"', q)}
BY_SERVER_NAME = {i for i, q in enumerate(QUERIES) if "server_name" in q}
#: Queries with data: (capitalized mode, default mode).
COUNTS = {"capitalized": 32, None: 23}
BODIES = ref.all_bodies()
METRICS = [m for b in BODIES.values() for m in b["metrics"]]


def _keys() -> dict[str, str]:
    services = {b["service"] for b in BODIES.values()}
    return {s: f"key-{s}-0123456789abcdefghijklmnopq" for s in sorted(services)}


def _feed(service: ScrapedService) -> None:
    keys = _keys()
    with httpx.Client(base_url=service.service.url, timeout=10) as c:
        for body in BODIES.values():
            r = c.post("/metrics", json=body, headers={"X-API-Key": keys[body["service"]]})
            assert r.status_code == 200, r.text


def _count(kind: str) -> float:
    return sum(m.get("value", 1.0) for m in METRICS if m["type"] == kind)


def _label_values(s: ScrapedService, label: str, metric: str) -> set[str]:
    """What Grafana lists for the reference's ``label_values(metric, label)``."""
    r = httpx.get(
        f"{s.prom.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
    )
    assert r.status_code == 200, r.text
    return set(r.json()["data"])


Results = dict[int, list[dict[str, Any]]]


Health = dict[tuple[str, str, str], float]


def _run(tmp_path: Path, mode: str | None) -> tuple[Results, Results, dict[str, set[str]], Health]:
    """Each query's result; each capitalized query's result with its booleans in lower case; the
    options of each template variable of the reference dashboard; the health-check counts."""
    env = {"METRICS_API_KEY_" + s.upper().replace("-", "_"): k for s, k in _keys().items()}
    if mode is not None:
        env["METRICS_OTEL_BOOL_LABELS"] = mode
    tools = "sum(mcp_tool_executions_total)"
    with scraped_service(tmp_path, env) as s:
        _feed(s)
        wait_for(lambda: s.prom.value(tools) == _count("tool_execution"), 20)
        # A second round a few scrapes later, so that every rate() has two differing samples;
        # then wait until all of it (the last body included) has been scraped.
        wait_for(lambda: len(s.prom.query("mcp_auth_requests_total[10s]")[0]["values"]) >= 3, 20)
        _feed(s)
        for name, kind in (
            ("mcp_tool_executions_total", "tool_execution"),
            ("mcp_tool_discovery_total", "tool_discovery"),
            ("mcp_health_checks_total", "health_check"),
        ):
            wait_for(lambda: s.prom.value(f"sum({name})") == 2 * _count(kind), 20)  # noqa: B023
        rate = "sum(rate(mcp_tool_executions_total[1m]))"
        wait_for(lambda: s.prom.value(rate) not in (None, 0.0), 20)
        results = {i: s.prom.query(q) for i, q in enumerate(QUERIES)}
        lower = {
            i: s.prom.query(QUERIES[i].replace('"True"', '"true"').replace('"False"', '"false"'))
            for i in CAPITALIZED
        }
        options: dict[str, set[str]] = {}
        for var in DASHBOARD["templating"]["list"]:
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"])
            assert m, var["query"]
            options[var["name"]] = _label_values(s, m.group(2), m.group(1))
        by = "sum by (endpoint, status_code, healthy) (mcp_health_checks_total)"
        health = {
            (r["metric"]["endpoint"], r["metric"]["status_code"], r["metric"]["healthy"]): float(
                r["value"][1]
            )
            for r in s.prom.query(by)
        }
    return results, lower, options, health


@pytest.mark.parametrize("mode", ["capitalized", None], ids=["capitalized", "default"])
def test_the_reference_dashboard_queries_return_data(tmp_path: Path, mode: str | None) -> None:
    assert len(QUERIES) == 35 and len(NEVER) == 3 and len(CAPITALIZED) == 9
    assert len(BY_SERVER_NAME) == 4 and not BY_SERVER_NAME & (NEVER | CAPITALIZED)
    results, lower, options, health = _run(tmp_path, mode)
    data = {i for i in range(len(QUERIES)) if results[i]}
    expected = set(range(len(QUERIES))) - NEVER
    if mode != "capitalized":
        expected -= CAPITALIZED
    # Written in lower case, the same queries return data in the default mode and none in
    # capitalized mode: the setting really switches the spelling.
    assert all(bool(lower[i]) == (mode != "capitalized") for i in CAPITALIZED), lower
    assert data == expected, {QUERIES[i]: bool(results[i]) for i in expected ^ data}
    assert len(data) == COUNTS[mode]
    print(f"reference dashboard, {mode or 'default'} mode: {len(data)} of 35 queries return data")

    # The numbers are right, not only present: two rounds of the reference clients' traffic.
    tools = [m for m in METRICS if m["type"] == "tool_execution"]
    per_server = results[QUERIES.index("sum(mcp_tool_executions_total) by (server_name)")]
    # (None: the tool events that name no server, one more group of `by (server_name)`.)
    servers = {m["dimensions"].get("server_name") or None for m in tools}
    assert len(servers - {None}) >= 3
    assert {r["metric"].get("server_name") for r in per_server} == servers
    assert sum(float(r["value"][1]) for r in per_server) == 2 * _count("tool_execution")
    count = results[QUERIES.index("count(count by (server_name)(mcp_tool_executions_total))")]
    assert float(count[0]["value"][1]) == len(servers)

    # Its template variables: `server` of the auth metrics, client_name and method of the tools.
    auth = [m for m in METRICS if m["type"] == "auth_request"]
    assert options["server"] == {m["dimensions"].get("server") for m in auth} - {None, ""}
    assert options["client"] == {m["dimensions"].get("client_name") for m in tools} - {None, ""}
    assert {"initialize", "tools/list", "tools/call"} <= options["method"]

    # mcp_health_checks_total as the reference exports it: endpoint, status_code and healthy
    # (spelled as success is), summing the checks' value.
    yes, no = ("True", "False") if mode == "capitalized" else ("true", "false")
    checks = [m["dimensions"] for m in METRICS if m["type"] == "health_check"]
    want: Health = {}
    for d in checks:
        key = (d["endpoint"], str(d["status_code"]), yes if d["healthy"] else no)
        want[key] = want.get(key, 0.0) + 2
    assert len(want) >= 2 and health == want
