"""Analytics views over a seeded history: exact counts, percentiles within one bucket of the
exact ones, CSV export, keys and roles, and bad parameters answered 422 naming field and rule."""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests._analytics_seed import Seed, assert_same_bucket, make_seed, post_seed
from tests._helpers import ADMIN_KEY, INGEST_KEY

#: The same answers on either backend (tests/conftest.py).
BACKENDS = ("sqlite", "postgresql")

ADMIN = {"X-API-Key": ADMIN_KEY}
H = {"X-API-Key": INGEST_KEY}
VIEWS = (
    "summary",
    "tools",
    "clients",
    "services",
    "tenants",
    "users",
    "auth",
    "discovery",
    "protocol",
    "timeseries",
)


@pytest.fixture
def seeded(client: TestClient) -> tuple[TestClient, Seed, dict[str, str]]:
    seed = make_seed()
    post_seed(client, seed, H)
    return client, seed, {"since": f"{seed.now - 4 * 86_400:.3f}", "until": f"{seed.now:.3f}"}


def viewer_key(client: TestClient) -> dict[str, str]:
    r = client.post(
        "/admin/keys", json={"role": "viewer", "description": "analytics"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["key"]}


def durations(metrics: list[dict[str, Any]]) -> list[float]:
    return [m["duration_ms"] for m in metrics]


def test_summary_is_exact_and_percentiles_fall_in_the_exact_values_bucket(seeded: Any) -> None:
    client, seed, span = seeded
    body = client.get("/analytics/summary", params=span, headers=ADMIN).json()
    calls = seed.tools()
    assert body["source"] == "rollup"
    assert body["calls"] == len(calls)
    assert body["errors"] == sum(1 for m in calls if not m["dimensions"]["success"])
    assert body["error_rate"] == pytest.approx(body["errors"] / body["calls"], abs=1e-6)
    assert body["input_tokens"] == sum(m["metadata"].get("input_tokens", 0) for m in calls)
    assert body["output_tokens"] == sum(m["metadata"].get("output_tokens", 0) for m in calls)
    assert body["distinct_clients"] == 2
    auth = seed.of("auth_request")
    assert body["distinct_users"] == len({m["dimensions"]["user_hash"] for m in auth})
    assert body["auth"]["requests"] == len(auth)
    assert body["auth"]["failures"] == sum(1 for m in auth if not m["dimensions"]["success"])
    for q in (0.5, 0.95, 0.99):
        assert_same_bucket(body["latency_ms"][f"p{round(q * 100)}"], durations(calls), q)
    assert body["latency_ms"]["max"] == max(durations(calls))


def test_breakdowns_by_tool_client_tenant_and_service_match_the_events(seeded: Any) -> None:
    client, seed, span = seeded
    tools = client.get("/analytics/tools", params=span, headers=ADMIN).json()
    expected = Counter(m["dimensions"]["tool_name"] for m in seed.tools())
    assert {r["tool"]: r["calls"] for r in tools["rows"]} == expected
    assert [r["calls"] for r in tools["rows"]] == sorted(expected.values(), reverse=True)
    for row in tools["rows"]:
        mine = seed.tools(tool_name=row["tool"])
        assert row["server"] == mine[0]["dimensions"]["server_name"]
        assert row["errors"] == sum(1 for m in mine if not m["dimensions"]["success"])
        assert_same_bucket(row["latency_ms"]["p95"], durations(mine), 0.95)

    clients = client.get("/analytics/clients", params=span, headers=ADMIN).json()
    assert {r["client"]: r["calls"] for r in clients["rows"]} == Counter(
        m["dimensions"]["client_name"] for m in seed.tools()
    )
    agents = client.get("/analytics/clients", params={**span, "by": "agent"}, headers=ADMIN).json()
    assert {r["agent"]: r["calls"] for r in agents["rows"]} == Counter(
        m["metadata"]["agent_id"] for m in seed.tools()
    )

    servers = client.get(
        "/analytics/services", params={**span, "by": "server"}, headers=ADMIN
    ).json()
    assert {(r["service"], r["server"]): r["calls"] for r in servers["rows"]} == Counter(
        ("svc", m["dimensions"]["server_name"]) for m in seed.tools()
    )
    tenants = client.get(
        "/analytics/tenants", params={**span, "sort": "tokens"}, headers=ADMIN
    ).json()
    for row in tenants["rows"]:
        mine = seed.tools(tenant_id=row["tenant"])
        assert row["calls"] == len(mine)
        assert row["input_tokens"] == sum(m["metadata"].get("input_tokens", 0) for m in mine)


def test_tenant_and_tool_csv_for_billing(seeded: Any) -> None:
    client, seed, span = seeded
    r = client.get(
        "/analytics/tenants",
        params={**span, "by": "tool", "format": "csv", "limit": "100"},
        headers=ADMIN,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="tenants.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(
        seed_pairs := {
            (m["metadata"]["tenant_id"], m["dimensions"]["tool_name"]) for m in seed.tools()
        }
    )
    for row in rows:
        mine = seed.tools(tenant_id=row["tenant"], tool_name=row["tool"])
        assert (row["tenant"], row["tool"]) in seed_pairs
        assert int(row["calls"]) == len(mine)
        assert int(row["input_tokens"]) == sum(m["metadata"].get("input_tokens", 0) for m in mine)
        assert int(row["output_tokens"]) == sum(m["metadata"].get("output_tokens", 0) for m in mine)
        assert {"latency_ms_p50", "latency_ms_p95", "latency_ms_p99"} <= set(row)


def test_users_auth_discovery_and_protocol(seeded: Any) -> None:
    client, seed, span = seeded
    auth = seed.of("auth_request")
    users = client.get(
        "/analytics/users", params={**span, "limit": "5", "offset": "0"}, headers=ADMIN
    ).json()
    per_user = Counter(m["dimensions"]["user_hash"] for m in auth)
    assert users["total"] == len(per_user) and len(users["rows"]) == 5
    assert [r["calls"] for r in users["rows"]] == sorted(per_user.values(), reverse=True)[:5]
    page2 = client.get(
        "/analytics/users", params={**span, "limit": "5", "offset": "5"}, headers=ADMIN
    ).json()
    assert not {r["user"] for r in page2["rows"]} & {r["user"] for r in users["rows"]}

    methods = client.get("/analytics/auth", params=span, headers=ADMIN).json()["rows"]
    for row in methods:
        mine = [m for m in auth if m["dimensions"]["method"] == row["method"]]
        ok = sum(1 for m in mine if m["dimensions"]["success"])
        assert row["calls"] == len(mine) and row["success_rate"] == pytest.approx(
            ok / len(mine), abs=1e-6
        )
        assert_same_bucket(row["latency_ms"]["p50"], durations(mine), 0.5)

    searches = seed.of("tool_discovery")
    disc = client.get("/analytics/discovery", params=span, headers=ADMIN).json()["rows"]
    assert len(disc) == 1 and disc[0]["calls"] == len(searches)
    for name, column in (
        ("total", "duration_ms"),
        ("embedding", "embedding_time_ms"),
        ("search", "search_time_ms"),
    ):
        values = [
            m["dimensions"][column] if column != "duration_ms" else m["duration_ms"]
            for m in searches
        ]
        assert_same_bucket(disc[0]["latency_ms"][name]["p95"], values, 0.95)
        assert disc[0]["latency_ms"][name]["avg"] == pytest.approx(
            sum(values) / len(values), abs=1e-3
        )

    flows = seed.of("protocol_latency")
    for row in client.get("/analytics/protocol", params=span, headers=ADMIN).json()["rows"]:
        mine = [m["duration_ms"] for m in flows if m["dimensions"]["flow_step"] == row["flow_step"]]
        assert row["calls"] == len(mine)
        assert_same_bucket(row["latency_ms"]["p99"], mine, 0.99)


def test_filters_narrow_every_view_and_uncovered_combinations_read_raw_rows(seeded: Any) -> None:
    client, seed, span = seeded
    body = client.get(
        "/analytics/tools", params={**span, "client": "claude", "success": "false"}, headers=ADMIN
    ).json()
    mine = [m for m in seed.tools(client_name="claude") if not m["dimensions"]["success"]]
    assert body["source"] == "rollup"  # the tool-and-client cube (migration 4)
    assert {r["tool"]: r["calls"] for r in body["rows"]} == Counter(
        m["dimensions"]["tool_name"] for m in mine
    )
    assert body["filters"] == {"client": "claude", "success": False}
    body = client.get(
        "/analytics/tools", params={**span, "client": "claude", "tenant": "acme"}, headers=ADMIN
    ).json()
    assert body["source"] == "raw"  # no cube holds tool, client and tenant together
    mine = seed.tools(client_name="claude", tenant_id="acme")
    assert {r["tool"]: r["calls"] for r in body["rows"]} == Counter(
        m["dimensions"]["tool_name"] for m in mine
    )
    summary = client.get(
        "/analytics/summary", params={**span, "tenant": "acme", "tool": "search"}, headers=ADMIN
    ).json()
    assert summary["calls"] == len(seed.tools(tenant_id="acme", tool_name="search"))
    assert (
        summary["distinct_users"] is None and summary["auth"] is None
    )  # auth events have no tenant
    other = client.get(
        "/analytics/summary", params={**span, "service": "nope"}, headers=ADMIN
    ).json()
    assert other["calls"] == 0 and other["latency_ms"]["p50"] is None


def test_timeseries_points_add_up_and_fill_empty_intervals(seeded: Any) -> None:
    client, seed, span = seeded
    total = len(seed.tools())
    for resolution, step_ms in (("hour", 3_600_000), ("day", 86_400_000)):
        body = client.get(
            "/analytics/timeseries", params={**span, "resolution": resolution}, headers=ADMIN
        ).json()
        points = body["points"]
        assert sum(p["calls"] for p in points) == total
        since_ms, until_ms = int(float(span["since"]) * 1000), int(float(span["until"]) * 1000)
        assert len(points) == len(range(since_ms // step_ms * step_ms, until_ms, step_ms))
        assert points[0]["t"] <= body["since"] and points[-1]["t"] <= body["until"]
    hours = client.get("/analytics/timeseries", params=span, headers=ADMIN).json()["points"]
    assert any(
        p["calls"] == 0 and p["latency_ms"]["p50"] is None for p in hours[:24]
    )  # the seed starts 3 days back
    recent = {"since": f"{seed.now - 6 * 3600:.3f}", "until": span["until"]}
    minutes = client.get(
        "/analytics/timeseries",
        params={**recent, "resolution": "minute", "type": "auth_request"},
        headers=ADMIN,
    ).json()
    assert len(minutes["points"]) in (360, 361)
    in_range = [m for m in seed.of("auth_request") if m["timestamp"] >= seed.now - 6 * 3600]
    assert sum(p["calls"] for p in minutes["points"]) == len(in_range)
    assert sum(p["errors"] for p in minutes["points"]) == sum(
        1 for m in in_range if not m["dimensions"]["success"]
    )


def test_viewer_and_admin_keys_read_ingest_keys_get_403(seeded: Any) -> None:
    client, _, span = seeded
    viewer = viewer_key(client)
    for view in VIEWS:
        assert client.get(f"/analytics/{view}", params=span, headers=viewer).status_code == 200, (
            view
        )
    r = client.get("/analytics/summary", headers=H)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.get("/analytics/summary").status_code == 401
    assert client.get("/analytics/summary", headers={"X-API-Key": "mcpm_nope"}).status_code == 401
    # A viewer key cannot ingest nor administer.
    body = {"service": "svc", "version": "1", "metrics": [{"type": "custom", "value": 1}]}
    assert client.post("/metrics", json=body, headers=viewer).status_code == 403
    assert client.get("/admin/keys", headers=viewer).status_code == 403


@pytest.mark.parametrize(
    ("view", "params", "field", "rule"),
    [
        ("summary", {"since": "yesterday"}, "since", "format"),
        ("summary", {"until": "2026-13-45"}, "until", "format"),
        (
            "summary",
            {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "since",
            "order",
        ),
        ("tools", {"limit": "0"}, "limit", "ge"),
        ("tools", {"limit": "1001"}, "limit", "le"),
        ("tools", {"limit": "ten"}, "limit", "integer"),
        ("tools", {"offset": "-1"}, "offset", "ge"),
        ("tools", {"sort": "name; DROP TABLE tool_metrics"}, "sort", "enum"),
        ("summary", {"success": "maybe"}, "success", "enum"),
        ("summary", {"service": "Not A Service!"}, "service", "pattern"),
        ("summary", {"tool": ""}, "tool", "min_length"),
        ("summary", {"tool": "x" * 300}, "tool", "max_length"),
        ("summary", {"servce": "svc"}, "servce", "unknown"),
        ("summary", {"format": "xml"}, "format", "enum"),
        ("clients", {"by": "tenant"}, "by", "enum"),
        ("discovery", {"tool": "search"}, "tool", "not_applicable"),
        ("users", {"client": "claude"}, "client", "not_applicable"),
        ("timeseries", {"since": "30d", "resolution": "minute"}, "resolution", "max_points"),
        ("timeseries", {"type": "custom"}, "type", "enum"),
    ],
)
def test_bad_parameters_are_422_naming_field_and_rule(
    client: TestClient, view: str, params: dict[str, str], field: str, rule: str
) -> None:
    r = client.get(f"/analytics/{view}", params=params, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_failed"
    assert error["details"][0]["field"] == field and error["details"][0]["rule"] == rule, error
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_filter_values_are_bound_never_sql(seeded: Any) -> None:
    client, _, span = seeded
    for value in ("' OR 1=1 --", "search'; DROP TABLE rollup_tools_hour; --", '=HYPERLINK("x")'):
        r = client.get(
            "/analytics/tools", params={**span, "tool": value, "tenant": value}, headers=ADMIN
        )
        assert r.status_code == 200 and r.json()["rows"] == [], r.text
    assert client.get("/analytics/tools", params=span, headers=ADMIN).json()["total"] == 3


def test_csv_cells_that_look_like_formulas_are_quoted(client: TestClient) -> None:
    metric = {
        "type": "tool_execution",
        "dimensions": {"method": "tools/call", "tool_name": "=cmd|calc", "success": True},
    }
    assert (
        client.post(
            "/metrics", json={"service": "svc", "version": "1", "metrics": [metric]}, headers=H
        ).status_code
        == 200
    )
    text = client.get("/analytics/tools", params={"format": "csv"}, headers=ADMIN).text
    assert "'=cmd|calc" in text and ",=cmd" not in text


def test_openapi_documents_every_view(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for view in VIEWS:
        params = {p["name"] for p in paths[f"/analytics/{view}"]["get"]["parameters"]}
        assert {"since", "until", "service", "format"} <= params
