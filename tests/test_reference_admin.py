"""The reference's admin calls mean the same here: a cleanup is a dry run unless asked otherwise,
``table_name`` is honoured, unknown parameters are refused, and its query-parameter forms, preview
and database endpoints answer in its shapes (as well as ours)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from metrics_service.storage import TABLES
from tests._helpers import ADMIN_KEY, INGEST_KEY, custom, db_rows, payload

ADMIN = {"X-API-Key": ADMIN_KEY}
H = {"X-API-Key": INGEST_KEY}


def post_aged(client: TestClient, ages_days: list[float]) -> None:
    now = time.time()
    metrics = [
        {**custom(float(i)), "timestamp": now - age * 86_400} for i, age in enumerate(ages_days)
    ]
    r = client.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200 and r.json()["accepted"] == len(ages_days), r.text


def count(settings: Any, table: str = "custom_metrics") -> int:
    return int(db_rows(settings.db_path, f"SELECT count(*) FROM {table}")[0][0])


def test_cleanup_is_a_dry_run_unless_dry_run_is_false(client: TestClient, settings: Any) -> None:
    post_aged(client, [40, 35, 1])
    client.put("/admin/retention/policies/custom_metrics?retention_days=30", headers=ADMIN)
    # The reference's routine call: POST /admin/retention/cleanup, no parameters.
    r = client.post("/admin/retention/cleanup", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["dry_run"] is True and body["operation"] == "dry_run"
    assert body["status"] == "success"
    assert body["table_results"]["custom_metrics"] == {
        "table": "custom_metrics",
        "status": "dry_run",
        "records_would_delete": 2,
        "retention_days": 30,
    }
    assert body["total_records_processed"] == 2 and count(settings) == 3
    done = client.post("/admin/retention/cleanup?dry_run=false", headers=ADMIN).json()
    assert done["operation"] == "cleanup"
    assert done["table_results"]["custom_metrics"]["records_deleted"] == 2
    assert done["table_results"]["custom_metrics"]["status"] == "completed"
    assert count(settings) == 1
    assert {"started_at", "completed_at", "duration_seconds", "tables_processed"} <= set(done)


def test_cleanup_takes_table_name_and_cleans_only_that_table(
    client: TestClient, settings: Any
) -> None:
    post_aged(client, [40])
    old = time.time() - 40 * 86_400
    tool = {
        "type": "tool_execution",
        "timestamp": old,
        "dimensions": {"method": "tools/call", "tool_name": "t", "success": True},
    }
    assert client.post("/metrics", json=payload(metrics=[tool]), headers=H).status_code == 200
    for table in ("custom_metrics", "tool_metrics"):
        client.put(f"/admin/retention/policies/{table}?retention_days=30", headers=ADMIN)
    r = client.post(
        "/admin/retention/cleanup", params={"table_name": "tool_metrics", "dry_run": "false"},
        headers=ADMIN,
    )  # fmt: skip
    assert r.status_code == 200
    assert [t["table"] for t in r.json()["tables"]] == ["tool_metrics"]
    assert count(settings, "tool_metrics") == 0 and count(settings) == 1
    # ``metrics`` (the reference's table of every event) means every raw table.
    every = client.post("/admin/retention/cleanup?table_name=metrics", headers=ADMIN).json()
    assert sorted(t["table"] for t in every["tables"]) == sorted(TABLES)
    assert every["table_results"]["custom_metrics"]["records_would_delete"] == 1
    missing = client.post("/admin/retention/cleanup?table_name=metrics_hourly", headers=ADMIN)
    assert missing.status_code == 404 and "custom_metrics" in missing.json()["detail"]
    clash = client.post(
        "/admin/retention/cleanup?table=tool_metrics&table_name=custom_metrics", headers=ADMIN
    )
    assert clash.status_code == 422
    assert count(settings) == 1


def test_unknown_parameters_and_a_body_are_refused_not_ignored(
    client: TestClient, settings: Any
) -> None:
    post_aged(client, [40])
    client.put("/admin/retention/policies/custom_metrics?retention_days=30", headers=ADMIN)
    r = client.post("/admin/retention/cleanup?dryrun=false", headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "dryrun"
    assert r.json()["error"]["details"][0]["rule"] == "unknown_parameter"
    # The reference's docs show a JSON body it never reads; here it is refused, not ignored.
    r = client.post("/admin/retention/cleanup", json={"dry_run": False}, headers=ADMIN)
    assert r.status_code == 422 and "dry_run=false" in r.json()["error"]["details"][0]["message"]
    assert client.get("/admin/retention/preview?table=x", headers=ADMIN).status_code == 422
    assert count(settings) == 1


def test_policies_in_the_query_parameter_form(client: TestClient) -> None:
    r = client.put(
        "/admin/retention/policies/tool_metrics?retention_days=120&is_active=false", headers=ADMIN
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["table_name"], body["retention_days"], body["is_active"]) == (
        "success",
        "tool_metrics",
        120,
        False,
    )
    tool = next(p for p in body["policies"] if p["table"] == "tool_metrics")
    assert tool["retention_days"] == 120 and tool["is_active"] is False
    assert tool["enabled"] is False
    # The body form, with the reference's is_active, answers with our list.
    r = client.put(
        "/admin/retention/policies/tool_metrics",
        json={"retention_days": 30, "is_active": True},
        headers=ADMIN,
    )
    tool = next(p for p in r.json() if p["table"] == "tool_metrics")
    assert (tool["retention_days"], tool["enabled"], tool["table_name"]) == (
        30,
        True,
        "tool_metrics",
    )
    both = client.put(
        "/admin/retention/policies/tool_metrics?retention_days=5",
        json={"retention_days": 30},
        headers=ADMIN,
    )
    assert both.status_code == 422
    assert client.put("/admin/retention/policies/tool_metrics", headers=ADMIN).status_code == 422
    bad = client.put("/admin/retention/policies/tool_metrics?retention_days=0", headers=ADMIN)
    assert bad.status_code == 422
    # ``metrics``: every raw table at once.
    client.put("/admin/retention/policies/metrics?retention_days=45", headers=ADMIN)
    policies = client.get("/admin/retention/policies", headers=ADMIN).json()
    assert {p["retention_days"] for p in policies} == {45}


def test_preview_database_stats_and_size(client: TestClient, settings: Any) -> None:
    post_aged(client, [40, 35, 20, 1])
    client.put("/admin/retention/policies/custom_metrics?retention_days=30", headers=ADMIN)
    preview = client.get("/admin/retention/preview", headers=ADMIN).json()
    custom_row = preview["custom_metrics"]
    assert custom_row["records_to_delete"] == 2 and custom_row["total_records"] == 4
    assert custom_row["percentage_to_delete"] == 50.0 and custom_row["retention_days"] == 30
    assert custom_row["oldest_record_to_delete"] < custom_row["newest_record_to_delete"]
    assert custom_row["newest_record_to_delete"] < custom_row["cutoff_date"]
    only = client.get("/admin/retention/preview?table_name=custom_metrics", headers=ADMIN).json()
    assert list(only) == ["custom_metrics"]
    client.put(
        "/admin/retention/policies/tool_metrics?retention_days=9&is_active=false", headers=ADMIN
    )
    assert "tool_metrics" not in client.get("/admin/retention/preview", headers=ADMIN).json()
    assert count(settings) == 4  # previews delete nothing

    stats = client.get("/admin/database/stats", headers=ADMIN).json()
    assert stats["custom_metrics"]["record_count"] == 4
    assert stats["custom_metrics"]["retention_days"] == 30
    assert stats["tool_metrics"]["policy_active"] is False
    assert stats["custom_metrics"]["oldest_record"] < stats["custom_metrics"]["newest_record"]
    assert stats["rollup_tools_hour"]["has_retention_policy"] is True

    size = client.get("/admin/database/size", headers=ADMIN).json()
    assert size["main_db_bytes"] == (settings.db_path).stat().st_size
    assert size["total_bytes"] == size["main_db_bytes"] + size["wal_bytes"] + size["shm_bytes"]
    assert size["page_count"] * size["page_size"] >= size["main_db_bytes"] - size["page_size"]
    assert 0 < size["database_efficiency"] <= 100
    # Admin only, as every /admin endpoint.
    for path in ("/admin/retention/preview", "/admin/database/stats", "/admin/database/size"):
        assert client.get(path, headers=H).status_code == 403
        assert client.get(path).status_code == 401
