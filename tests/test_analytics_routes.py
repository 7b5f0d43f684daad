"""The analytics routes: CSV exports keep their header when no row matches, and tool calls
(``tools/call``) are told apart from all MCP requests in the summary and the time series."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service.analytics import queries
from metrics_service.analytics.routes import CSV_COLUMNS
from tests._analytics_seed import (
    Seed,
    assert_same_bucket,
    handshakes,
    make_seed,
    post_seed,
    registry_events,
)
from tests._helpers import ADMIN_KEY, INGEST_KEY

#: The same answers on either backend (tests/conftest.py).
BACKENDS = ("sqlite", "postgresql")

ADMIN = {"X-API-Key": ADMIN_KEY}
H = {"X-API-Key": INGEST_KEY}
#: Views whose answer always has rows (one summary row; a point per interval of the range).
ALWAYS_ROWS = {"summary", "timeseries"}


@pytest.fixture
def seeded(client: TestClient) -> tuple[TestClient, Seed, dict[str, str]]:
    seed = make_seed(400)
    seed.metrics += handshakes(seed.now)
    seed.metrics += registry_events(seed.now)
    post_seed(client, seed, H)
    return client, seed, {"since": f"{seed.now - 4 * 86_400:.3f}", "until": f"{seed.now:.3f}"}


def csv_header_and_rows(text: str) -> tuple[list[str], list[list[str]]]:
    header, *rows = list(csv.reader(io.StringIO(text)))
    return header, rows


def breakdowns() -> list[tuple[str, str]]:
    return [(v, b) for v, (_, by, _) in queries.VIEWS.items() if v not in ALWAYS_ROWS for b in by]


def test_every_breakdown_has_a_declared_header() -> None:
    # A new view (or a new `by`) must declare the header its empty export gets.
    assert set(CSV_COLUMNS) == set(breakdowns())


@pytest.mark.parametrize(("view", "by"), breakdowns())
def test_an_empty_export_has_the_same_header_as_a_full_one(seeded: Any, view: str, by: str) -> None:
    client, seed, span = seeded
    query = {**span, "format": "csv", **({"by": by} if by else {})}
    full = client.get(f"/analytics/{view}", params=query, headers=ADMIN)
    assert full.status_code == 200, full.text
    header, rows = csv_header_and_rows(full.text)
    assert rows, "the seeded range has rows"
    assert tuple(header) == CSV_COLUMNS[(view, by)]
    # A day before the seeded history: no row at all.
    before = {"since": f"{seed.now - 10 * 86_400:.3f}", "until": f"{seed.now - 9 * 86_400:.3f}"}
    empty = client.get(f"/analytics/{view}", params={**query, **before}, headers=ADMIN)
    assert empty.status_code == 200
    assert empty.text == ",".join(CSV_COLUMNS[(view, by)]) + "\r\n"
    as_json = client.get(
        f"/analytics/{view}", params={**query, **before, "format": "json"}, headers=ADMIN
    )
    assert as_json.json()["rows"] == []


def test_the_summary_tells_tool_calls_from_all_requests(seeded: Any) -> None:
    client, seed, span = seeded
    body = client.get("/analytics/summary", params=span, headers=ADMIN).json()
    everything = seed.tools()
    calls = [m for m in everything if m["dimensions"]["method"] == "tools/call"]
    assert len(calls) < len(everything)
    assert body["calls"] == len(everything)  # unchanged: every MCP request
    tool = body["tool_calls"]
    assert tool["calls"] == len(calls)
    assert tool["errors"] == sum(1 for m in calls if not m["dimensions"]["success"])
    assert tool["error_rate"] == pytest.approx(tool["errors"] / tool["calls"], abs=1e-6)
    assert body["errors"] > tool["errors"]
    assert tool["input_tokens"] == sum(m["metadata"].get("input_tokens", 0) for m in calls)
    assert tool["latency_ms"]["count"] == len(calls)
    assert tool["latency_ms"]["max"] == max(m["duration_ms"] for m in calls)
    for q in (0.5, 0.95, 0.99):
        durations = [m["duration_ms"] for m in calls]
        assert_same_bucket(tool["latency_ms"][f"p{round(q * 100)}"], durations, q)
    # The same set as the tools view's rows, so the headline and the table agree.
    tools = client.get("/analytics/tools", params={**span, "limit": "1000"}, headers=ADMIN).json()
    assert sum(r["calls"] for r in tools["rows"]) == tool["calls"]
    assert sum(r["errors"] for r in tools["rows"]) == tool["errors"]
    # Filters apply to it as to the rest, from the rollups (a client and a tenant too).
    for name, value, field in (
        ("client", "cursor", "client_name"),
        ("tenant", "acme", "tenant_id"),
    ):
        filtered = client.get(
            "/analytics/summary", params={**span, name: value}, headers=ADMIN
        ).json()
        mine = [m for m in calls if {**m["dimensions"], **m["metadata"]}.get(field) == value]
        assert filtered["tool_calls"]["calls"] == len(mine)
        assert filtered["source"] == "rollup"


def test_a_summary_of_nothing_has_zero_tool_calls(client: TestClient) -> None:
    body = client.get("/analytics/summary", headers=ADMIN).json()
    assert body["tool_calls"]["calls"] == 0 and body["tool_calls"]["error_rate"] is None
    assert body["tool_calls"]["latency_ms"]["p95"] is None


def test_the_time_series_has_tool_calls_per_point(seeded: Any) -> None:
    client, seed, span = seeded
    body = client.get(
        "/analytics/timeseries", params={**span, "resolution": "hour"}, headers=ADMIN
    ).json()
    points = body["points"]
    everything = seed.tools()
    calls = [m for m in everything if m["dimensions"]["method"] == "tools/call"]
    assert sum(p["calls"] for p in points) == len(everything)
    assert sum(p["tool_calls"]["calls"] for p in points) == len(calls)
    assert sum(p["tool_calls"]["errors"] for p in points) == sum(
        1 for m in calls if not m["dimensions"]["success"]
    )
    assert all(p["tool_calls"]["calls"] <= p["calls"] for p in points)
    quiet = [p for p in points if p["tool_calls"]["calls"] == 0]
    assert quiet and all(p["tool_calls"]["latency_ms"]["p95"] is None for p in quiet)
    # Other families have no tool calls.
    auth = client.get(
        "/analytics/timeseries", params={**span, "type": "auth_request"}, headers=ADMIN
    ).json()
    assert all("tool_calls" not in p for p in auth["points"])
