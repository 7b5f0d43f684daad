"""The discovery helper records one tool_discovery event per search, without the query text."""

from __future__ import annotations

import json

import pytest
from mcp_metrics import MetricsClient, hash_value, track_discovery

from .conftest import API_KEY, IngestServer

pytestmark = pytest.mark.anyio


def make_client(url: str) -> MetricsClient:
    return MetricsClient(url=url, api_key=API_KEY, service="mw-registry", flush_interval_s=60)


TOOLS = ["get_weather", "get_forecast", "search_files", "read_file"]


def search(query: str, top_k: int) -> list[str]:
    words = query.split()
    return [t for t in TOOLS if any(w in t for w in words)][:top_k]


async def test_context_manager_with_phases(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as metrics:
        query = "weather in paris"
        with track_discovery(metrics, query, top_k=10, top_n=3) as d:
            with d.phase("embedding"):
                vector = [float(len(w)) for w in query.split()]
            with d.phase("search"):
                hits = search(query, 10)
            d.results_count = len(hits)
        assert vector
    [event] = ingest.accepted
    dims = event["dimensions"]
    assert event["type"] == "tool_discovery"
    assert dims["query"] == hash_value(query)
    assert (dims["results_count"], dims["top_k"], dims["top_n"]) == (1, 10, 3)
    assert 0 <= dims["embedding_time_ms"] <= event["duration_ms"]
    assert 0 <= dims["search_time_ms"] <= event["duration_ms"]
    assert "paris" not in json.dumps(ingest.requests[0].body)


async def test_decorator_reads_arguments_and_result(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as metrics:

        @track_discovery(metrics, query_mode="truncate", query_max_chars=4, top_n=1)
        async def find(query: str, top_k: int = 5) -> list[str]:
            return search(query, top_k)

        @track_discovery(metrics, query_mode="omit")
        def find_sync(query: str, top_k: int = 2) -> list[str]:
            return search(query, top_k)

        assert await find("file please") == ["search_files", "read_file"]
        assert find_sync("get", top_k=3) == ["get_weather", "get_forecast"]
    first, second = (e["dimensions"] for e in ingest.accepted)
    assert first == {"query": "file", "results_count": 2, "top_k": 5, "top_n": 1}
    assert second == {"results_count": 2, "top_k": 3}


async def test_a_failing_search_is_recorded_and_reraised(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as metrics:
        with pytest.raises(KeyError), track_discovery(metrics, "q", top_k=1):
            raise KeyError("index missing")
    [event] = ingest.accepted
    assert event["dimensions"]["results_count"] == 0
    assert event["metadata"] == {"error": "KeyError"}


def test_bad_query_mode_fails_at_set_up() -> None:
    metrics = MetricsClient(url=None, api_key=None, service="x", enabled=False)
    with pytest.raises(ValueError, match="query_mode"):
        track_discovery(metrics, "q", query_mode="plain")  # type: ignore[arg-type]
