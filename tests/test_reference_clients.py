"""The MCP Gateway Registry's clients, pointed at this service unchanged: every body they and
their docs produce is accepted and lands, field by field, in the typed columns (tests/_reference.py
has the bodies and where they come from)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.cli import main as cli
from tests import _reference as ref
from tests._helpers import ADMIN_KEY, db_rows

ADMIN = {"X-API-Key": ADMIN_KEY}
#: One key per service name the bodies use.
SERVICE_KEYS = {
    "auth-server": "key-auth-server-0123456789abcdefghijkl",
    "registry": "key-registry-0123456789abcdefghijklmno",
    "mcpgw": "key-mcpgw-0123456789abcdefghijklmnopqr",
    "registry-service": "key-registry-service-0123456789abcdefgh",
    "mcpgw-server": "key-mcpgw-server-0123456789abcdefghijklm",
    "multi-service": "key-multi-service-0123456789abcdefghijk",
}


def _env_name(service: str) -> str:
    return "METRICS_API_KEY_" + service.upper().replace("-", "_")


@pytest.fixture
def every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for service, key in SERVICE_KEYS.items():
        monkeypatch.setenv(_env_name(service), key)


@pytest.fixture
def app(tmp_path: Path, every_key: None) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(db_path=tmp_path / "m.db", admin_api_key=ADMIN_KEY))) as c:
        yield c


def post(c: TestClient, body: dict[str, Any], key: str | None = None) -> Any:
    return c.post(
        "/metrics", json=body, headers={"X-API-Key": key or SERVICE_KEYS[body["service"]]}
    )


def test_every_body_of_the_reference_clients_and_docs_is_stored(
    app: TestClient, tmp_path: Path
) -> None:
    bodies = ref.all_bodies()
    for name, body in bodies.items():
        r = post(app, body)
        assert r.status_code == 200, (name, r.text)
        got = r.json()
        assert got["status"] == "success"
        assert (got["accepted"], got["rejected"]) == (len(body["metrics"]), 0), (name, got)
    db = tmp_path / "m.db"
    stored = dict(db_rows(db, "SELECT metric_type, count(*) FROM metrics GROUP BY 1"))
    sent: dict[str, int] = {}
    for body in bodies.values():
        for m in body["metrics"]:
            sent[m["type"]] = sent.get(m["type"], 0) + 1
    assert stored == sent and sum(stored.values()) == ref.metric_count(bodies)
    assert set(stored) == {
        "auth_request",
        "tool_execution",
        "tool_discovery",
        "protocol_latency",
        "registry_operation",
        "health_check",
        "custom",
    }


def test_auth_server_events_fill_the_typed_columns(app: TestClient, tmp_path: Path) -> None:
    for body in (
        ref.auth_server_auth(),
        ref.auth_server_auth(success=False, server="atlassian"),
        ref.auth_server_tool("initialize"),
        ref.auth_server_tool("tools/call", "current_time_by_timezone"),
        ref.auth_server_tool("tools/call", "boom", success=False),
    ):
        assert post(app, body).status_code == 200
    db = tmp_path / "m.db"
    assert db_rows(
        db,
        "SELECT service, server, success, method, user_hash, error_code FROM auth_metrics"
        " ORDER BY id",
    ) == [
        ("auth-server", "currenttime", 1, "keycloak", ref.user_hash("alice"), None),
        ("auth-server", "atlassian", 0, "unknown", "", "403"),
    ]
    rows = db_rows(
        db,
        "SELECT method, tool_name, server_name, server_path, user_hash, client_name,"
        " client_version, success, error_code, input_size_bytes, output_size_bytes"
        " FROM tool_metrics ORDER BY id",
    )
    alice = ref.user_hash("alice")
    common = ("currenttime", "/currenttime/", alice, "claude-code", "1.0.98")

    def size(tool: str) -> int:
        return len(json.dumps({"name": tool, "arguments": {"tz": "UTC"}}).encode())

    # initialize reported with tool_name "initialize": a request naming no tool.
    assert rows == [
        ("initialize", None, *common, 1, None, 2, 0),
        (
            "tools/call",
            "current_time_by_timezone",
            *common,
            1,
            None,
            size("current_time_by_timezone"),
            0,
        ),
        ("tools/call", "boom", *common, 0, "500", size("boom"), 0),
    ]


def test_protocol_latency_in_seconds_and_the_reference_step_names(
    app: TestClient, tmp_path: Path
) -> None:
    assert post(app, ref.auth_server_protocol_latency(0.25, 1.5)).status_code == 200
    rows = db_rows(
        tmp_path / "m.db",
        "SELECT flow_step, server_name, value, duration_ms FROM protocol_latency_metrics"
        " ORDER BY id",
    )
    assert rows == [
        ("initialize->tools/list", "currenttime", 1.0, 250.0),
        ("tools/list->tools/call", "currenttime", 1.0, 1500.0),
        ("initialize->tools/call", "currenttime", 1.0, 1750.0),
    ]
    # The reference's extra dimensions are kept, not dropped.
    dims = db_rows(tmp_path / "m.db", "SELECT dimensions FROM protocol_latency_metrics LIMIT 1")
    assert "session_key" in dims[0][0] and "user_hash" in dims[0][0]
    # duration_ms, when given, is the explicit form and wins over value.
    body = ref.auth_server_protocol_latency()
    body["metrics"] = [{**body["metrics"][0], "duration_ms": 12.5}]
    assert post(app, body).status_code == 200
    assert db_rows(
        tmp_path / "m.db",
        "SELECT duration_ms FROM protocol_latency_metrics ORDER BY id DESC LIMIT 1",
    ) == [(12.5,)]


def test_registry_events_fill_the_typed_columns(app: TestClient, tmp_path: Path) -> None:
    bodies = [
        ref.registry_operation(),
        ref.registry_operation("read", "server", False, "nope"),
        ref.registry_search_discovery("weather"),
        *ref.registry_tool_discovery_tracker("currenttime", tools=3),
        ref.registry_health_check("currenttime"),
        ref.registry_health_check("atlassian", healthy=False),
        ref.registry_headers_analysis(),
    ]
    for body in bodies:
        assert post(app, body).status_code == 200, body
    db = tmp_path / "m.db"
    bob = ref.user_hash("bob")
    assert db_rows(
        db,
        "SELECT service, operation, resource_type, success, resource_id, user_id, error_code,"
        " duration_ms FROM registry_operation_metrics ORDER BY id",
    ) == [
        ("registry", "list", "server", 1, "", bob, None, 4.2),
        ("registry", "read", "server", 0, "nope", bob, "404", 4.2),
    ]
    # results_count -1 is the registry's "not available": NULL, not a rejected metric.
    assert db_rows(
        db, "SELECT query, results_count, top_k, top_n FROM discovery_metrics ORDER BY id"
    ) == [("weather", None, None, None), ("tools_from_currenttime", 3, None, None)]
    # tools/list reported as a tool name without method: the method is inferred.
    assert db_rows(
        db,
        "SELECT method, tool_name, server_path, output_size_bytes, input_size_bytes"
        " FROM tool_metrics",
    ) == [("tools/list", None, "http://mcpgw:8000/currenttime/", 300, None)]
    assert db_rows(
        db,
        "SELECT endpoint, status_code, healthy, duration_ms FROM health_check_metrics ORDER BY id",
    ) == [("/health/currenttime", 200, 1, 7.75), ("/health/atlassian", 500, 0, 7.75)]
    custom = db_rows(
        db, "SELECT value, json_extract(dimensions, '$.metric_name') FROM custom_metrics"
    )
    assert custom == [(1.0, "request_headers_analysis")]


def test_standalone_client_and_docs_examples_use_the_reference_field_names(
    app: TestClient, tmp_path: Path
) -> None:
    assert post(app, ref.standalone_client_batch()).status_code == 200
    for body in ref.docs_examples():
        assert post(app, body).status_code == 200, body
    db = tmp_path / "m.db"
    assert db_rows(db, "SELECT DISTINCT instance_id FROM tool_metrics WHERE service = 'mcpgw'") == [
        ("mcpgw-4242",)
    ]
    # metadata.error_code as an integer is kept as its text.
    assert db_rows(db, "SELECT error_code FROM auth_metrics WHERE service = 'mcpgw'") == [("401",)]
    assert db_rows(
        db,
        "SELECT tool_name, method, server_path, error_code, input_size_bytes, output_size_bytes"
        " FROM tool_metrics ORDER BY id",
    ) == [
        ("intelligent_tool_finder", "tools/call", "/mcpgw/", "TimeoutError", 64, 2048),
        ("file_reader", "tools/call", "/tools/file/read", None, 256, 1024),
        ("calculator", "tools/call", None, None, None, None),
    ]
    # top_k_services / top_n_tools and embedding / faiss times land in the typed columns.
    assert db_rows(
        db,
        "SELECT query, results_count, top_k, top_n, embedding_time_ms, search_time_ms"
        " FROM discovery_metrics ORDER BY id",
    ) == [
        ("file operations", 15, 5, 10, 12.3, 8.9),
        ("file operations", 15, 5, 10, 12.3, 8.9),
        ("search tools", 10, None, None, None, None),
    ]
    assert db_rows(db, "SELECT count(*) FROM registry_operation_metrics") == [(1,)]
    assert db_rows(db, "SELECT healthy, status_code FROM health_check_metrics") == [(0, 500)]


def test_version_is_optional(app: TestClient, tmp_path: Path) -> None:
    body = ref.registry_health_check()
    del body["version"]
    r = post(app, body)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert db_rows(tmp_path / "m.db", "SELECT service_version FROM health_check_metrics") == [("",)]


def test_a_request_whose_items_are_all_invalid_still_names_each_one(app: TestClient) -> None:
    body = ref.registry_operation()
    body["metrics"] = [
        {**body["metrics"][0], "dimensions": {"resource_type": "server"}},  # no operation
        {"type": "tool_discovery", "dimensions": {"results_count": -2}},
        {"type": "nonsense"},
    ]
    r = post(app, body)
    assert r.status_code == 422
    got = r.json()
    assert got["status"] == "error" and got["accepted"] == 0 and got["rejected"] == 3
    assert [(e["index"], e["field"], e["rule"]) for e in got["errors"]] == [
        (0, "metrics[0].dimensions.operation", "required"),
        (1, "metrics[1].dimensions.results_count", "integer"),
        (2, "metrics[2].type", "enum"),
    ]
    assert got["detail"] == got["error"]["message"]


def test_the_compose_deployment_works_with_one_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As the reference's docker-compose sets them; MCPGW's variable unset, so empty.
    monkeypatch.setenv("METRICS_API_KEY_AUTH", ref.AUTH_KEY)
    monkeypatch.setenv("METRICS_API_KEY_REGISTRY", ref.REGISTRY_KEY)
    monkeypatch.setenv("METRICS_API_KEY_MCPGW", "")
    settings = Settings(db_path=tmp_path / "m.db")
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as c:
        r = post(c, ref.auth_server_auth(), ref.AUTH_KEY)
        assert r.status_code == 403
        detail = r.json()["detail"]
        assert "'auth'" in detail and "'auth-server'" in detail
        assert (
            "METRICS_SERVICE_ALIASES=auth:auth-server" in detail and "--alias auth-server" in detail
        )
        assert post(c, ref.registry_operation(), ref.REGISTRY_KEY).status_code == 200
    assert any("METRICS_API_KEY_MCPGW is empty" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("METRICS_SERVICE_ALIASES", ref.ALIASES)
    with TestClient(create_app(Settings(db_path=tmp_path / "m.db"))) as c:
        for body in (ref.auth_server_auth(), ref.auth_server_tool("tools/list")):
            assert post(c, body, ref.AUTH_KEY).status_code == 200
        # The alias widens that key only: the registry's key may still not post as auth-server.
        assert post(c, ref.auth_server_auth(), ref.REGISTRY_KEY).status_code == 403
    # Rows keep the name the client posted.
    assert db_rows(tmp_path / "m.db", "SELECT DISTINCT service FROM auth_metrics") == [
        ("auth-server",)
    ]


def test_bad_aliases_stop_start_up_naming_the_variable() -> None:
    from metrics_service.errors import ConfigError
    from metrics_service.settings import load_settings

    for bad in ("auth", "auth:Auth Server", ":x"):
        with pytest.raises(ConfigError, match="METRICS_SERVICE_ALIASES"):
            load_settings(service_aliases=bad)


def test_per_key_aliases_through_the_api_and_the_cli(
    app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = app.post(
        "/admin/keys",
        json={"service": "registry-service", "aliases": ["registry"], "description": "compose"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["aliases"] == ["registry"]
    assert post(app, ref.registry_operation(), created["key"]).status_code == 200
    assert post(app, ref.auth_server_auth(), created["key"]).status_code == 403
    listed = next(
        k for k in app.get("/admin/keys", headers=ADMIN).json() if k["id"] == created["id"]
    )
    assert listed["aliases"] == ["registry"]
    bad = app.post("/admin/keys", json={"role": "viewer", "aliases": ["x"]}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "aliases"
    # The CLI form, against the same database; the running service picks it up.
    monkeypatch.setenv("SQLITE_DB_PATH", str(tmp_path / "m.db"))
    assert cli(["keys", "create", "--service", "auth", "--alias", "auth-server"]) == 0
    out = capsys.readouterr().out
    assert "also as auth-server" in out
    secret = next(line.strip() for line in out.splitlines() if line.strip().startswith("mcpm_"))
    assert post(app, ref.auth_server_auth(), secret).status_code == 200
    assert cli(["keys", "create", "--service", "auth", "--alias", "Not Valid"]) == 2


def test_response_contract_of_the_reference_is_there_too(app: TestClient) -> None:
    key = {"X-API-Key": SERVICE_KEYS["registry"]}
    health = app.get("/health").json()
    assert health["service"] == "metrics-collection" and health["status"] == "ok"
    rl = app.get("/rate-limit", headers=key).json()
    assert rl["service"] == "registry" and rl["rate_limit"] == rl["limit"] == 1000
    assert rl["available_tokens"] == rl["remaining"] and 0 <= rl["reset_time_seconds"] <= 60
    flush = app.post("/flush", headers=key)
    assert flush.status_code == 200 and flush.json()["status"] == "success"
    assert app.post("/flush").status_code == 401
    root = app.get("/").json()
    assert root["status"] == "running" and root["endpoints"]["metrics"] == "/metrics"
    # Error bodies carry ``detail`` beside ``error``.
    denied = app.get("/rate-limit", headers={"X-API-Key": "no-such-key-0123456789abcdef"})
    assert denied.status_code == 401
    assert denied.json()["detail"] == denied.json()["error"]["message"]


def test_analytics_of_the_reference_families(app: TestClient) -> None:
    for body in (
        ref.registry_operation(),
        ref.registry_operation(),
        ref.registry_operation("read", "server", False, "nope"),
        ref.registry_health_check("currenttime"),
        ref.registry_health_check("atlassian", healthy=False),
        ref.registry_health_check("atlassian", healthy=True),
        ref.auth_server_protocol_latency(0.25, 1.5),
        *ref.registry_tool_discovery_tracker(),
    ):
        assert post(app, body).status_code == 200
    reg = app.get("/analytics/registry", headers=ADMIN).json()
    assert reg["source"] == "rollup"
    rows = {(r["operation"], r["resource_type"]): r for r in reg["rows"]}
    assert rows[("list", "server")]["calls"] == 2 and rows[("list", "server")]["errors"] == 0
    assert rows[("read", "server")]["errors"] == 1 and rows[("read", "server")]["error_rate"] == 1
    assert rows[("list", "server")]["latency_ms"]["max"] == 4.2
    health = {r["endpoint"]: r for r in app.get("/analytics/health", headers=ADMIN).json()["rows"]}
    assert health["/health/atlassian"]["calls"] == 2 and health["/health/atlassian"]["errors"] == 1
    assert health["/health/atlassian"]["healthy_rate"] == 0.5
    assert health["/health/currenttime"]["healthy_rate"] == 1
    flows = {
        r["flow_step"]: r for r in app.get("/analytics/protocol", headers=ADMIN).json()["rows"]
    }
    assert flows["tools/list->tools/call"]["latency_ms"]["max"] == 1500
    failed = app.get("/analytics/registry", params={"success": "false"}, headers=ADMIN).json()
    assert [(r["operation"], r["calls"]) for r in failed["rows"]] == [("read", 1)]
    series = app.get(
        "/analytics/timeseries", params={"type": "health_check", "since": "1h"}, headers=ADMIN
    ).json()
    assert sum(p["calls"] for p in series["points"]) == 3
    csv = app.get("/analytics/health", params={"format": "csv"}, headers=ADMIN).text
    assert csv.splitlines()[0].startswith("endpoint,calls,errors,error_rate")
    tools = app.get("/analytics/summary", headers=ADMIN).json()
    assert tools["calls"] == 1 and tools["tool_calls"]["calls"] == 0  # tools/list, not a call
