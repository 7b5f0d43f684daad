"""The MCP Gateway Registry's Grafana dashboard against this service: its 35 PromQL queries
(``tests/reference_dashboard.json``, our layout of them) run on a real Prometheus scraping a real
service process fed by the reference clients' bodies, in both boolean-label modes.

On the reference itself 32 of the 35 return data: the last three take ``histogram_quantile`` of a
counter (no ``le`` label), which is empty everywhere. With ``METRICS_OTEL_BOOL_LABELS=capitalized``
the same 32 return data here; with the default (``true``/``false``, as the newer upstream exports)
the 9 that filter on ``success="True"``/``"False"`` are empty, and return data once written in
lower case.
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

QUERIES: list[str] = [
    t["expr"]
    for p in json.loads((Path(__file__).parent / "reference_dashboard.json").read_text())["panels"]
    for t in p["targets"]
]
#: histogram_quantile over a counter: no data on the reference either.
NEVER = {
    i for i, q in enumerate(QUERIES) if q.startswith("histogram_quantile") and "_bucket" not in q
}
CAPITALIZED = {i for i, q in enumerate(QUERIES) if re.search(r'success="(True|False)"', q)}


def _keys() -> dict[str, str]:
    services = {b["service"] for b in ref.all_bodies().values()}
    return {s: f"key-{s}-0123456789abcdefghijklmnopq" for s in sorted(services)}


def _feed(service: ScrapedService) -> None:
    keys = _keys()
    with httpx.Client(base_url=service.service.url, timeout=10) as c:
        for body in ref.all_bodies().values():
            r = c.post("/metrics", json=body, headers={"X-API-Key": keys[body["service"]]})
            assert r.status_code == 200, r.text


def _with_data(service: ScrapedService) -> dict[int, list[dict[str, Any]]]:
    return {i: service.prom.query(q) for i, q in enumerate(QUERIES)}


Results = dict[int, list[dict[str, Any]]]


def _run(tmp_path: Path, mode: str | None) -> Results:
    """Each query's result (key ``-1 - i``: query ``i`` with its booleans in lower case)."""
    env = {"METRICS_API_KEY_" + s.upper().replace("-", "_"): k for s, k in _keys().items()}
    if mode is not None:
        env["METRICS_OTEL_BOOL_LABELS"] = mode
    with scraped_service(tmp_path, env) as s:
        _feed(s)
        s.prom.wait_for_series("mcp_tool_executions_total")
        # A second round a few scrapes later, so that every rate() has two differing samples.
        first = s.prom.value("sum(mcp_tool_executions_total)")
        wait_for(lambda: len(s.prom.query("mcp_auth_requests_total[10s]")[0]["values"]) >= 3, 20)
        _feed(s)
        wait_for(lambda: (s.prom.value("sum(mcp_tool_executions_total)") or 0) > (first or 0), 20)
        rate = "sum(rate(mcp_tool_executions_total[1m]))"
        wait_for(lambda: s.prom.value(rate) not in (None, 0.0), 20)
        results = _with_data(s)
        lower = {
            i: s.prom.query(QUERIES[i].replace('"True"', '"true"').replace('"False"', '"false"'))
            for i in CAPITALIZED
        }
    return {**results, **{-1 - i: v for i, v in lower.items()}}


@pytest.mark.xfail(
    strict=True,
    reason="not done yet (issue 13): telemetry.py still exports `server`, not `server_name`, on "
    "tool and protocol metrics, so the reference's `by (server_name)` queries return nothing",
)
@pytest.mark.parametrize("mode", ["capitalized", None], ids=["capitalized", "default"])
def test_the_reference_dashboard_queries_return_data(tmp_path: Path, mode: str | None) -> None:
    assert len(QUERIES) == 35 and len(NEVER) == 3 and len(CAPITALIZED) == 9
    results = _run(tmp_path, mode)
    data = {i for i in range(len(QUERIES)) if results[i]}
    expected = set(range(len(QUERIES))) - NEVER
    if mode != "capitalized":
        expected -= CAPITALIZED
        # Written in lower case, the same queries return data in the default mode.
        assert all(results[-1 - i] for i in CAPITALIZED)
    assert data == expected, {QUERIES[i]: bool(results[i]) for i in expected ^ data}
    print(f"reference dashboard, {mode or 'default'} mode: {len(data)} of 35 queries return data")
    # The numbers are right, not only present: two rounds of the reference clients' traffic.
    bodies = ref.all_bodies().values()
    tools = sum(1 for b in bodies for m in b["metrics"] if m["type"] == "tool_execution")
    assert (
        float(
            results[QUERIES.index("sum(mcp_tool_executions_total) by (server_name)")][0]["value"][1]
        )
        > 0
    )
    total = sum(
        float(r["value"][1])
        for r in results[QUERIES.index("sum(mcp_tool_executions_total) by (server_name)")]
    )
    assert total == 2 * tools
    servers = results[QUERIES.index("count(count by (server_name)(mcp_tool_executions_total))")]
    assert float(servers[0]["value"][1]) == len(
        {m["dimensions"].get("server_name") for b in bodies for m in b["metrics"]
         if m["type"] == "tool_execution"}
    )  # fmt: skip
