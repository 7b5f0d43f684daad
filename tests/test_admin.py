"""Admin endpoints: retention policies and cleanup, database stats, keys; SQL injection attempts."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings
from metrics_service.settings import valid_service_name
from metrics_service.storage import TABLES
from tests._helpers import ADMIN_KEY, INGEST_KEY, INJECTIONS, custom, payload
from tests._servers import stored_rows

#: The admin API answers the same on either backend; only the size figures of ``db stats`` are
#: the backend's own.
BACKENDS = ("sqlite", "postgresql")

ADMIN = {"X-API-Key": ADMIN_KEY}
H = {"X-API-Key": INGEST_KEY}
DAY_S = 86_400


def post_aged(c: TestClient, ages_days: list[float]) -> None:
    now = time.time()
    metrics = [{**custom(i), "timestamp": now - age * DAY_S} for i, age in enumerate(ages_days)]
    r = c.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200 and r.json()["accepted"] == len(ages_days), r.text


def test_db_stats(client: TestClient, backend: str) -> None:
    client.post("/metrics", json=payload(metrics=[custom(1), custom(2)]), headers=H)
    stats = client.get("/admin/db/stats", headers=ADMIN).json()
    assert stats["rows"]["custom_metrics"] == 2 and stats["total_rows"] == 2
    if backend == "sqlite":
        assert stats["file_bytes"] > 0 and stats["wal_bytes"] >= 0
    else:
        assert stats["database_bytes"] > 0 and stats["partitions"] > 0
    assert stats["schema_version"] >= 1


def test_keys_api_create_list_revoke_never_shows_secrets(
    client: TestClient, settings: Settings, backend: str
) -> None:
    created = client.post(
        "/admin/keys", json={"service": "svc", "description": "ci"}, headers=ADMIN
    )
    assert created.status_code == 201
    secret = created.json()["key"]
    listing = client.get("/admin/keys", headers=ADMIN)
    assert secret not in listing.text and INGEST_KEY not in listing.text
    assert {k["service"] for k in listing.json()} >= {"svc"}
    assert (
        client.delete(f"/admin/keys/{created.json()['id']}", headers=ADMIN).json()["active"]
        is False
    )
    assert client.delete("/admin/keys/999999", headers=ADMIN).status_code == 404
    stored = repr(stored_rows(settings, "SELECT * FROM api_keys"))
    assert secret not in stored and INGEST_KEY not in stored
    if backend == "sqlite":  # nor anywhere in the file and its WAL (free pages included)
        raw = settings.db_path.read_bytes() + settings.db_path.with_name("m.db-wal").read_bytes()
        assert secret.encode() not in raw and INGEST_KEY.encode() not in raw


def test_ingest_key_needs_a_service(client: TestClient) -> None:
    r = client.post("/admin/keys", json={"role": "ingest"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "service"
    r = client.post("/admin/keys", json={"service": "svc", "role": "root"}, headers=ADMIN)
    assert r.status_code == 422


@pytest.mark.parametrize("table", INJECTIONS)
def test_sql_injection_on_admin_paths_is_refused(
    client: TestClient, settings: Settings, table: str
) -> None:
    client.post("/metrics", json=payload(metrics=[custom(1)]), headers=H)
    r = client.put(f"/admin/retention/policies/{table}", json={"retention_days": 1}, headers=ADMIN)
    assert r.status_code == 404
    r = client.post("/admin/retention/cleanup", params={"table": table}, headers=ADMIN)
    assert r.status_code == 404
    r = client.delete(f"/admin/keys/{table}", headers=ADMIN)
    assert r.status_code == 422
    r = client.post("/admin/retention/cleanup", params={"dry_run": table}, headers=ADMIN)
    assert r.status_code == 422
    r = client.post("/admin/keys", json={"service": table}, headers=ADMIN)
    if valid_service_name(table):  # a legal name is data, stored verbatim
        assert r.status_code == 201 and r.json()["service"] == table
    else:
        assert r.status_code == 422
    # Nothing was dropped or deleted.
    assert stored_rows(settings, "SELECT count(*) FROM custom_metrics") == [(1,)]
    assert len(stored_rows(settings, "SELECT id FROM api_keys")) >= 3
    assert sorted(
        p["table"] for p in client.get("/admin/retention/policies", headers=ADMIN).json()
    ) == sorted(TABLES)


def test_sql_injection_in_ingest_values_is_stored_as_data(
    client: TestClient, settings: Settings
) -> None:
    evil = "x'); DROP TABLE tool_metrics; --"
    r = client.post("/metrics", json=payload(metrics=[custom(1, name=evil)]), headers=H)
    assert r.status_code == 200
    ((dimensions,),) = stored_rows(settings, "SELECT dimensions FROM custom_metrics")
    assert json.loads(dimensions) == {"name": evil}
    assert stored_rows(settings, "SELECT count(*) FROM tool_metrics") == [(0,)]
