"""Retention: policies per table, dry runs, deletion by event time in short chunks that leave
the writer to ingest between them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.retention import pause_after
from metrics_service.storage import TABLES
from tests._helpers import ADMIN_KEY, INGEST_KEY, custom, db_rows, payload
from tests._servers import stored_rows

#: Policies and deletion by event time are the same on either backend (tests/conftest.py); the
#: chunking tests build their own SQLite settings (PostgreSQL drops whole partitions instead:
#: tests/test_postgres_backend.py).
BACKENDS = ("sqlite", "postgresql")

ADMIN = {"X-API-Key": ADMIN_KEY}
H = {"X-API-Key": INGEST_KEY}
DAY_S = 86_400


def post_aged(c: TestClient, ages_days: list[float]) -> None:
    now = time.time()
    metrics = [{**custom(i), "timestamp": now - age * DAY_S} for i, age in enumerate(ages_days)]
    r = c.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200 and r.json()["accepted"] == len(ages_days), r.text


def _record_chunks(c: TestClient, events: list[Any] | None = None) -> list[Any]:
    """Each chunk retention deletes, as (table, rows), in order (the telemetry hook it calls)."""
    chunks: list[Any] = [] if events is None else events
    telemetry = c.app.state.metrics.telemetry  # type: ignore[attr-defined]
    telemetry.on_retention_deleted = lambda table, rows: chunks.append((table, rows))
    return chunks


def test_policies_default_to_retention_days_and_can_be_changed(client: TestClient) -> None:
    policies = client.get("/admin/retention/policies", headers=ADMIN).json()
    assert {p["table"] for p in policies} == set(TABLES)
    assert all(p["retention_days"] == 90 and p["is_default"] for p in policies)
    r = client.put(
        "/admin/retention/policies/tool_metrics", json={"retention_days": 7}, headers=ADMIN
    )
    assert r.status_code == 200
    tool = next(p for p in r.json() if p["table"] == "tool_metrics")
    assert tool == {
        "table": "tool_metrics",
        "retention_days": 7,
        "is_default": False,
        "enabled": True,
        "table_name": "tool_metrics",
        "is_active": True,
    }
    r = client.put(
        "/admin/retention/policies/tool_metrics", json={"retention_days": None}, headers=ADMIN
    )
    assert next(p for p in r.json() if p["table"] == "tool_metrics")["retention_days"] == 90


def test_retention_deletes_by_event_time_with_dry_run_first(
    client: TestClient, settings: Settings
) -> None:
    post_aged(client, [40, 35, 20, 1, 0])
    client.put(
        "/admin/retention/policies/custom_metrics", json={"retention_days": 30}, headers=ADMIN
    )
    dry = client.post("/admin/retention/cleanup?dry_run=true", headers=ADMIN).json()
    custom_row = next(t for t in dry["tables"] if t["table"] == "custom_metrics")
    assert dry["dry_run"] is True and custom_row["rows"] == 2
    assert stored_rows(settings, "SELECT count(*) FROM custom_metrics") == [(5,)]
    done = client.post("/admin/retention/cleanup?dry_run=false", headers=ADMIN).json()
    assert next(t for t in done["tables"] if t["table"] == "custom_metrics")["rows"] == 2
    assert stored_rows(settings, "SELECT value FROM custom_metrics ORDER BY value") == [
        (2.0,),
        (3.0,),
        (4.0,),
    ]


def test_retention_deletes_a_backlog_in_chunks(tmp_path: Path, keyed_env: None) -> None:
    settings = Settings(db_path=tmp_path / "m.db", admin_api_key=ADMIN_KEY, retention_chunk_rows=7)
    with TestClient(create_app(settings)) as c:
        post_aged(c, [10.0] * 50 + [0.0] * 3)
        chunks = _record_chunks(c)
        c.put("/admin/retention/policies/custom_metrics", json={"retention_days": 5}, headers=ADMIN)
        done = c.post(
            "/admin/retention/cleanup?table=custom_metrics&dry_run=false", headers=ADMIN
        ).json()
        assert [t["rows"] for t in done["tables"]] == [50]
    # One short transaction per chunk of at most METRICS_RETENTION_CHUNK_ROWS rows.
    assert chunks == [("custom_metrics", 7)] * 7 + [("custom_metrics", 1)]
    assert db_rows(settings.db_path, "SELECT count(*) FROM custom_metrics") == [(3,)]


def test_disabled_policy_deletes_nothing(client: TestClient, settings: Settings) -> None:
    post_aged(client, [40])
    client.put(
        "/admin/retention/policies/custom_metrics",
        json={"retention_days": 30, "enabled": False},
        headers=ADMIN,
    )
    client.post("/admin/retention/cleanup?dry_run=false", headers=ADMIN)
    assert stored_rows(settings, "SELECT count(*) FROM custom_metrics") == [(1,)]


def test_a_backlog_is_deleted_with_commits_of_new_metrics_between_its_chunks(
    tmp_path: Path, keyed_env: None
) -> None:
    """While retention works through a backlog, ingest keeps committing: commits land between
    chunks, and each chunk is followed by a pause of (1 / share - 1) times its own length."""
    settings = Settings(
        db_path=tmp_path / "m.db",
        admin_api_key=ADMIN_KEY,
        retention_chunk_rows=100,
        retention_max_share=0.25,
    )
    with TestClient(create_app(settings)) as c:
        for _ in range(6):
            post_aged(c, [10.0] * 1000)
        c.put("/admin/retention/policies/custom_metrics", json={"retention_days": 5}, headers=ADMIN)
        events = _record_chunks(c)
        state = c.app.state.metrics  # type: ignore[attr-defined]
        state.queue.add_listener(lambda batches, size, elapsed: events.append(("commit", size)))
        done = threading.Event()

        def cleanup() -> None:
            try:
                r = c.post(
                    "/admin/retention/cleanup?table=custom_metrics&dry_run=false", headers=ADMIN
                )
                assert r.status_code == 200 and [t["rows"] for t in r.json()["tables"]] == [6000]
            finally:
                done.set()

        worker = threading.Thread(target=cleanup)
        worker.start()
        posted = 0
        while not done.is_set():
            assert c.post("/metrics", json=payload(), headers=H).status_code == 200
            posted += 1
        worker.join(30)
    chunks = [i for i, e in enumerate(events) if e[0] == "custom_metrics"]
    assert len(chunks) == 60
    between = [e for e in events[chunks[0] : chunks[-1]] if e[0] == "commit"]
    assert len(between) >= 5, events
    assert db_rows(settings.db_path, "SELECT count(*) FROM custom_metrics") == [(posted,)]


def test_the_pause_after_a_chunk_keeps_deleting_to_its_share_of_the_time() -> None:
    assert pause_after(0.010, 0.25) == pytest.approx(0.030)  # deleting takes a quarter of the time
    assert pause_after(0.010, 0.5) == pytest.approx(0.010)
    assert pause_after(0.010, 1.0) == 0
