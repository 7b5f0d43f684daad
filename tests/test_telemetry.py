"""Telemetry through the app's own Prometheus endpoint: names, labels, values, cardinality cap."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from metrics_service import Settings, create_app
from metrics_service.telemetry import INSTRUMENTS, SECONDS_BUCKETS, ZERO_SERIES, Telemetry
from metrics_service.validation import Validator
from tests._helpers import INGEST_KEY, auth_event, custom, payload, tool_event

H = {"X-API-Key": INGEST_KEY}


@pytest.fixture
def app_client(tmp_path: Path, keyed_env: None) -> Iterator[TestClient]:
    settings = Settings(
        db_path=tmp_path / "m.db", otel_cardinality_limit=20, otel_service_name="metrics-under-test"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def scrape(c: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    port = c.app.state.metrics.telemetry.prometheus_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # An empty label value is an absent label to Prometheus (the exporter pads series of
            # one family to the same label names, e.g. next to the overflow series).
            labels = tuple(
                sorted(
                    (k, v)
                    for k, v in s.labels.items()
                    if v != "" and not k.startswith("otel_scope")
                )
            )
            samples.setdefault(s.name, {})[labels] = s.value
    return samples


def test_counters_and_histograms_match_what_was_posted(app_client: TestClient) -> None:
    events = [
        auth_event(True, "jwt", 5),
        auth_event(True, "jwt", 40),
        auth_event(False, "oauth", 900),
    ]
    events += [
        tool_event("search"),
        tool_event("search", success=False),
        {**auth_event(), "value": 3},
    ]
    events += [
        {
            "type": "protocol_latency",
            "duration_ms": 1500,
            "dimensions": {"flow_step": "initialize->tools/list", "server_name": "srv"},
        }
    ]
    events += [
        {
            "type": "tool_discovery",
            "duration_ms": 80,
            "dimensions": {
                "query": "q",
                "results_count": 7,
                "embedding_time_ms": 30,
                "search_time_ms": 2,
            },
        }
    ]
    assert app_client.post("/metrics", json=payload(metrics=events), headers=H).json()[
        "accepted"
    ] == len(events)
    s = scrape(app_client)
    auth = s["mcp_auth_requests_total"]
    assert (
        auth[(("method", "jwt"), ("server", "auth-1"), ("service", "svc"), ("success", "true"))]
        == 5
    )  # 1 + 1 + value 3
    assert (
        auth[(("method", "oauth"), ("server", "auth-1"), ("service", "svc"), ("success", "false"))]
        == 1
    )
    jwt = (("method", "jwt"), ("server", "auth-1"), ("service", "svc"), ("success", "true"))
    buckets = s["mcp_auth_request_duration_seconds_bucket"]
    assert buckets[tuple(sorted((*jwt, ("le", "0.005"))))] == 1
    assert buckets[tuple(sorted((*jwt, ("le", "0.05"))))] == 3
    assert s["mcp_auth_request_duration_seconds_count"][jwt] == 3
    assert s["mcp_auth_request_duration_seconds_sum"][jwt] == pytest.approx(0.005 + 0.04 + 0.0125)
    tool_ok = (
        ("client_name", "claude"),
        ("method", "tools/call"),
        ("server_name", "srv"),
        ("service", "svc"),
        ("success", "true"),
        ("tool_name", "search"),
    )
    assert s["mcp_tool_executions_total"][tool_ok] == 1
    assert s["mcp_tool_output_size_bytes_sum"][tool_ok] == 2048
    step = (("flow_step", "initialize->tools/list"), ("server_name", "srv"), ("service", "svc"))
    assert s["mcp_protocol_latency_seconds_count"][step] == 1
    assert s["mcp_tool_discovery_embedding_duration_seconds_sum"][
        (("service", "svc"),)
    ] == pytest.approx(0.03)
    assert s["mcp_tool_discovery_results_sum"][(("service", "svc"),)] == 7
    accepted = s["metrics_service_metrics_accepted_total"]
    assert (
        accepted[(("type", "auth_request"),)] == 4 and accepted[(("type", "tool_execution"),)] == 2
    )
    assert s["metrics_service_requests_total"][(("status", "200"),)] == 1
    assert any(
        labels == (("service_name", "metrics-under-test"),)
        or ("service_name", "metrics-under-test") in labels
        for labels in s["target_info"]
    )
    # Every bound of the instrument is a bucket of the exposition, and +Inf holds all 3.
    bounds = {dict(labels)["le"] for labels in buckets if dict(labels)["method"] == "jwt"}
    assert bounds == {f"{b}" for b in SECONDS_BUCKETS} | {"+Inf"}
    assert buckets[tuple(sorted((*jwt, ("le", "+Inf"))))] == 3


def test_an_absent_and_an_empty_dimension_are_one_series(app_client: TestClient) -> None:
    # Recording groups rows by their raw values (None and "" apart) before labelling them; the
    # groups that end up with the same labels must add up, not overwrite each other.
    step = {"type": "protocol_latency", "dimensions": {"flow_step": "initialize->tools/list"}}
    events = [
        {**step, "duration_ms": 3},
        {**step, "duration_ms": 40, "dimensions": {**step["dimensions"], "server_name": ""}},
    ]
    events += [
        {**tool_event("search"), "duration_ms": 8},
        {**tool_event("search"), "duration_ms": 700},
    ]
    events[-1]["dimensions"] = {**events[-1]["dimensions"], "client_name": ""}
    events[-2]["dimensions"] = {
        k: v for k, v in events[-2]["dimensions"].items() if k != "client_name"
    }
    assert (
        app_client.post("/metrics", json=payload(metrics=events), headers=H).json()["accepted"] == 4
    )
    s = scrape(app_client)
    flow = (("flow_step", "initialize->tools/list"), ("service", "svc"))
    assert s["mcp_protocol_latency_seconds_count"][flow] == 2
    assert s["mcp_protocol_latency_seconds_sum"][flow] == pytest.approx(0.043)
    assert s["mcp_protocol_latency_seconds_bucket"][tuple(sorted((*flow, ("le", "0.005"))))] == 1
    assert s["mcp_protocol_latency_seconds_bucket"][tuple(sorted((*flow, ("le", "0.05"))))] == 2
    tool = (
        ("method", "tools/call"),
        ("server_name", "srv"),
        ("service", "svc"),
        ("success", "true"),
        ("tool_name", "search"),
    )
    assert s["mcp_tool_executions_total"][tool] == 2
    assert s["mcp_tool_execution_duration_seconds_count"][tool] == 2
    assert (
        s["mcp_tool_execution_duration_seconds_bucket"][tuple(sorted((*tool, ("le", "0.01"))))] == 1
    )
    assert (
        s["mcp_tool_execution_duration_seconds_bucket"][tuple(sorted((*tool, ("le", "1.0"))))] == 2
    )


def test_never_labels_user_hashes_queries_or_sessions(app_client: TestClient) -> None:
    secret_like = ["user-hash-abc", "select secret query", "session-123"]
    events = [
        {
            **auth_event(),
            "dimensions": {"success": True, "method": "jwt", "user_hash": secret_like[0]},
        },
        {"type": "tool_discovery", "dimensions": {"query": secret_like[1]}},
        {
            **tool_event(),
            "dimensions": {**tool_event()["dimensions"], "session_id": secret_like[2]},
        },
    ]
    assert app_client.post("/metrics", json=payload(metrics=events), headers=H).json()[
        "accepted"
    ] == len(events)
    port = app_client.app.state.metrics.telemetry.prometheus_port  # type: ignore[attr-defined]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "mcp_tool_discovery_total" in text and "mcp_tool_executions_total" in text
    assert not any(value in text for value in secret_like)


def test_self_metrics_count_rejections_auth_failures_and_rate_limits(
    tmp_path: Path, keyed_env: None
) -> None:
    with TestClient(create_app(Settings(db_path=tmp_path / "m.db", rate_limit_per_min=2))) as c:
        c.post(
            "/metrics",
            json=payload(metrics=[custom(1), {"type": "nope"}, {"type": "custom", "value": "x"}]),
            headers=H,
        )
        c.post("/metrics", json=payload(), headers={"X-API-Key": "nope-nope-nope-nope-nope"})
        c.post("/metrics", json=payload(service="other"), headers=H)
        c.post("/metrics", json=payload(), headers=H)
        s = scrape(c)
    rejected = s["metrics_service_metrics_rejected_total"]
    assert {k: v for k, v in rejected.items() if v} == {
        (("reason", "enum"),): 1,
        (("reason", "type"),): 1,
    }
    assert s["metrics_service_auth_failures_total"][(("reason", "unknown_key"),)] == 1
    assert s["metrics_service_auth_failures_total"][(("reason", "wrong_service"),)] == 1
    assert s["metrics_service_rate_limited_requests_total"][()] == 1
    assert s["metrics_service_requests_total"] == {
        (("status", "200"),): 1,
        (("status", "401"),): 1,
        (("status", "403"),): 1,
        (("status", "429"),): 1,
    }
    assert s["metrics_service_commit_batch_metrics_count"][()] >= 1
    assert s["metrics_service_database_size_bytes"][(("file", "db"),)] > 0


def test_label_sets_beyond_the_cap_go_to_one_overflow_series(app_client: TestClient) -> None:
    events = [tool_event(f"tool-{i}") for i in range(200)]
    assert (
        app_client.post("/metrics", json=payload(metrics=events), headers=H).json()["accepted"]
        == 200
    )
    s = scrape(app_client)
    executions = s["mcp_tool_executions_total"]
    assert len(executions) == 21  # 20 label sets + the overflow series
    assert executions[(("otel_metric_overflow", "true"),)] == 180
    assert sum(executions.values()) == 200
    durations = s["mcp_tool_execution_duration_seconds_count"]
    assert len(durations) == 21 and sum(durations.values()) == 200


def test_histogram_series_stay_capped_without_any_collection(tmp_path: Path) -> None:
    """Memory is bounded by the cap, not by collections: 53 label sets for a cap of 10 leave 10
    series and the overflow one, and OTLP's MetricsData carries all 53 values."""
    settings = Settings(
        db_path=tmp_path / "m.db", otel_prometheus_enabled=False, otel_cardinality_limit=10
    )
    telemetry = Telemetry(settings)
    validator = Validator(settings)

    def commit(tools: list[str]) -> None:
        batch = validator.decode(
            json.dumps(payload(metrics=[tool_event(t) for t in tools])).encode()
        )
        telemetry.on_commit([batch], batch.accepted, 0.001)

    def durations() -> dict[str, int]:
        data = telemetry.collect()
        points = [
            p
            for m in data.resource_metrics[0].scope_metrics[0].metrics
            if m.name == "mcp_tool_execution_duration_seconds"
            for p in m.data.data_points
        ]
        return {
            str(p.attributes.get("tool_name", "overflow")): p.count  # type: ignore[union-attr]
            for p in points
        }

    commit(["search"] * 3)
    assert durations() == {"search": 3}
    for i in range(0, 50, 10):
        commit([f"tool-{j}" for j in range(i, i + 10)])
    counts = durations()
    assert len(counts) == 11 and counts["overflow"] == 41 and sum(counts.values()) == 53
    assert len(telemetry.histograms["mcp_tool_execution_duration_seconds"].series) == 10
    telemetry.shutdown()


def test_rare_event_counters_are_exported_at_zero_from_start(app_client: TestClient) -> None:
    s = scrape(app_client)
    for name, keys in ZERO_SERIES.items():
        labels = INSTRUMENTS[name].labels
        exported = s[f"{name}_total"]
        for key in keys:
            assert exported[tuple(sorted(zip(labels, key, strict=True)))] == 0, (name, key)
    assert len(s["metrics_service_metrics_rejected_total"]) > 10  # every rule, not a sample
    # ... and they count from there; the others appear when they first happen.
    app_client.post("/metrics", json=payload(), headers={"X-API-Key": "nope-nope-nope-nope-x"})
    after = scrape(app_client)
    assert after["metrics_service_auth_failures_total"][(("reason", "unknown_key"),)] == 1
    assert after["metrics_service_auth_failures_total"][(("reason", "missing_key"),)] == 0
    assert "mcp_tool_executions_total" not in after


def test_the_telemetry_uses_no_private_module_of_a_library() -> None:
    """OpenTelemetry's ``_internal`` and the like can change in any release."""
    import ast

    root = Path(__file__).resolve().parent.parent / "metrics_service"
    private = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                top, *rest = name.split(".")
                if top != "metrics_service" and any(p.startswith("_") for p in rest):
                    private.append(f"{path.name}: {name}")
    assert not private, private


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_shutdown_closes_the_prometheus_endpoint_and_its_thread(tmp_path: Path, host: str) -> None:
    """The endpoint answers until shutdown; afterwards its port refuses connections and no
    thread of its server is left (the shutdown wakes the server's poll instead of waiting it
    out)."""
    import socket
    import threading

    t = Telemetry(
        Settings(db_path=tmp_path / "m.db", otel_prometheus_port=0, otel_prometheus_host=host)
    )
    t.start()
    port = t.prometheus_port
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
    assert httpx.get(url).status_code == 200
    t.shutdown(1)
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    assert not [th for th in threading.enumerate() if th.name == "prometheus-shutdown"]
