"""A database file of the MCP Gateway Registry's metrics-service is adopted at start-up, and the
SQL its docs give operators runs on this service's database.

The reference file is built here from the shape of the reference's schema (the tables its
``init_database`` creates and, when its migration tool ran, the tables that adds), with rows as
its ``store_metrics_batch`` writes them: every event in ``metrics`` and the auth, discovery and
tool events also in their own tables.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.cli import main as cli
from metrics_service.storage.sqlite import migrations, reference
from tests import _reference as ref
from tests._helpers import ADMIN_KEY, db_rows

REF_KEY = "mcp_metrics_0123456789abcdefghijklmnopqrstuvwxyzABCD"
OLD_KEY = "mcp_metrics_revoked_0123456789abcdefghijklmnopqrstu"

# The reference's schema, from its shape (column names and types as it declares them).
REFERENCE_SCHEMA = [
    "CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, key_hash TEXT UNIQUE NOT NULL,"
    " service_name TEXT NOT NULL, created_at TEXT NOT NULL, last_used_at TEXT,"
    " is_active BOOLEAN DEFAULT 1, rate_limit INTEGER DEFAULT 1000)",
    "CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,"
    " service TEXT NOT NULL, service_version TEXT, instance_id TEXT, metric_type TEXT NOT NULL,"
    " timestamp TEXT NOT NULL, value REAL NOT NULL, duration_ms REAL, dimensions TEXT,"
    " metadata TEXT, created_at TEXT DEFAULT (datetime('now')))",
    "CREATE TABLE auth_metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,"
    " timestamp TEXT NOT NULL, service TEXT NOT NULL, duration_ms REAL, success BOOLEAN,"
    " method TEXT, server TEXT, user_hash TEXT, error_code TEXT,"
    " created_at TEXT DEFAULT (datetime('now')))",
    "CREATE TABLE discovery_metrics (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " request_id TEXT NOT NULL, timestamp TEXT NOT NULL, service TEXT NOT NULL,"
    " duration_ms REAL, query TEXT, results_count INTEGER, top_k_services INTEGER,"
    " top_n_tools INTEGER, embedding_time_ms REAL, faiss_search_time_ms REAL,"
    " created_at TEXT DEFAULT (datetime('now')))",
    "CREATE TABLE tool_metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,"
    " timestamp TEXT NOT NULL, service TEXT NOT NULL, duration_ms REAL, tool_name TEXT,"
    " server_path TEXT, server_name TEXT, success BOOLEAN, error_code TEXT,"
    " input_size_bytes INTEGER, output_size_bytes INTEGER, client_name TEXT,"
    " client_version TEXT, method TEXT, user_hash TEXT,"
    " created_at TEXT DEFAULT (datetime('now')))",
    "CREATE INDEX idx_metrics_timestamp ON metrics(timestamp)",
    "CREATE INDEX idx_auth_timestamp ON auth_metrics(timestamp)",
    "CREATE INDEX idx_tool_name ON tool_metrics(tool_name, timestamp)",
    "CREATE INDEX idx_api_keys_hash ON api_keys(key_hash)",
    "CREATE INDEX idx_api_keys_service ON api_keys(service_name)",  # the same name as ours
]
# What its separate migration tool adds (a file may or may not have these).
REFERENCE_MIGRATED = [
    "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " applied_at TEXT NOT NULL)",
    "CREATE TABLE retention_policies (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " table_name TEXT UNIQUE NOT NULL, retention_days INTEGER NOT NULL,"
    " is_active BOOLEAN DEFAULT 1, created_at TEXT DEFAULT (datetime('now')),"
    " updated_at TEXT DEFAULT (datetime('now')))",
    "CREATE TABLE metrics_hourly (id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,"
    " metric_type TEXT NOT NULL, hour_timestamp TEXT NOT NULL, count INTEGER DEFAULT 0)",
    "INSERT INTO schema_migrations VALUES (1, 'initial_schema', '2025-10-01T00:00:00')",
    "INSERT INTO retention_policies (table_name, retention_days) VALUES ('metrics', 90)",
]


def _store(conn: sqlite3.Connection, body: dict[str, Any], when: datetime, rid: str) -> None:
    """As the reference stores one request: ``metrics`` and the family's own table."""
    for m in body["metrics"]:
        ts = when.replace(tzinfo=None).isoformat()
        dims, meta = m.get("dimensions", {}), m.get("metadata", {})
        conn.execute(
            "INSERT INTO metrics (request_id, service, service_version, instance_id, metric_type,"
            " timestamp, value, duration_ms, dimensions, metadata) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                rid,
                body["service"],
                body.get("version"),
                body.get("instance_id"),
                m["type"],
                ts,
                m.get("value", 1.0),
                m.get("duration_ms"),
                json.dumps(dims),
                json.dumps(meta),
            ),
        )
        if m["type"] == "auth_request":
            conn.execute(
                "INSERT INTO auth_metrics (request_id, timestamp, service, duration_ms, success,"
                " method, server, user_hash, error_code) VALUES (?,?,?,?,?,?,?,?,?)",
                (rid, ts, body["service"], m.get("duration_ms"), dims.get("success"),
                 dims.get("method"), dims.get("server"), dims.get("user_hash"),
                 meta.get("error_code")),
            )  # fmt: skip
        elif m["type"] == "tool_execution":
            conn.execute(
                "INSERT INTO tool_metrics (request_id, timestamp, service, duration_ms, tool_name,"
                " server_path, server_name, success, error_code, input_size_bytes,"
                " output_size_bytes, client_name, client_version, method, user_hash)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rid, ts, body["service"], m.get("duration_ms"), dims.get("tool_name"),
                 dims.get("server_path"), dims.get("server_name"), dims.get("success"),
                 meta.get("error_code"), meta.get("input_size_bytes"),
                 meta.get("output_size_bytes"), dims.get("client_name"),
                 dims.get("client_version"), dims.get("method"), dims.get("user_hash")),
            )  # fmt: skip


def reference_database(path: Path, *, migrated: bool = True) -> dict[str, int]:
    """A reference file with this history; returns the events it holds by kind of outcome."""
    conn = sqlite3.connect(path)
    for sql in REFERENCE_SCHEMA + (REFERENCE_MIGRATED if migrated else []):
        conn.execute(sql)
    now = datetime.now(UTC)
    for key, service, active in ((REF_KEY, "auth-server", 1), (OLD_KEY, "registry-service", 0)):
        conn.execute(
            "INSERT INTO api_keys (key_hash, service_name, created_at, is_active, rate_limit)"
            " VALUES (?, ?, '2025-10-01 10:00:00', ?, 500)",
            (hashlib.sha256(key.encode()).hexdigest(), service, active),
        )
    bodies = list(ref.all_bodies().values())
    recent = 0
    for i, body in enumerate(bodies):
        _store(conn, body, now - timedelta(hours=i), f"req_{i:016x}")
        recent += len(body["metrics"])
    # Beyond retention (90 days): not imported, left in reference_metrics.
    _store(conn, ref.auth_server_auth(), now - timedelta(days=120), "req_old")
    # What this service refuses: a service name with capitals and spaces.
    bad = ref.registry_operation()
    bad["service"] = "Registry Service"
    _store(conn, bad, now - timedelta(hours=1), "req_bad")
    conn.commit()
    conn.close()
    return {"recent": recent, "expired": 1, "rejected": 1}


@pytest.mark.parametrize("migrated", [True, False], ids=["with-its-migrations", "bare"])
def test_a_reference_database_is_adopted_at_start_up_keeping_its_rows(
    tmp_path: Path, migrated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "metrics.db"
    expected = reference_database(db, migrated=migrated)
    settings = Settings(db_path=db, admin_api_key=ADMIN_KEY)
    with TestClient(create_app(settings)) as c:  # "table auth_metrics already exists" before
        assert c.get("/ready").status_code == 200
        # Its keys work with the same secrets, bound to their service; inactive stays refused.
        r = c.post("/metrics", json=ref.auth_server_auth(), headers={"X-API-Key": REF_KEY})
        assert r.status_code == 200, r.text
        gone = c.post("/metrics", json=ref.registry_operation(), headers={"X-API-Key": OLD_KEY})
        assert gone.status_code == 401
        keys = {
            k["service"]: k for k in c.get("/admin/keys", headers={"X-API-Key": ADMIN_KEY}).json()
        }
        assert keys["auth-server"]["source"] == "reference" and keys["auth-server"]["active"]
        assert keys["auth-server"]["rate_limit_per_min"] == 500
        assert not keys["registry-service"]["active"]
        summary = c.get("/analytics/registry", headers={"X-API-Key": ADMIN_KEY}).json()
        assert summary["total"] >= 1
    tables = {r[0] for r in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"reference_metrics", "reference_auth_metrics", "reference_api_keys"} <= tables
    assert ("reference_schema_migrations" in tables) is migrated
    assert db_rows(db, "PRAGMA user_version")[0][0] == migrations.LATEST_VERSION
    imported = db_rows(db, "SELECT name, done, imported, expired, rejected FROM reference_import")
    assert sorted(imported) == [
        ("api_keys", 1, 2, 0, 0),  # the inactive one imported revoked
        ("metrics", 1, expected["recent"], expected["expired"], expected["rejected"]),
    ]
    # Every recent reference event is in this service's tables (+1: the request above).
    ours = db_rows(db, "SELECT count(*) FROM metrics WHERE source_id IS NOT NULL")[0][0]
    assert ours == expected["recent"] + 1
    by_type = dict(db_rows(db, "SELECT metric_type, count(*) FROM metrics GROUP BY 1"))
    ref_by_type = dict(
        db_rows(
            db,
            "SELECT metric_type, count(*) FROM reference_metrics WHERE request_id LIKE 'req_0%'"
            " GROUP BY 1",
        )
    )
    ref_by_type["auth_request"] += 1
    assert by_type == ref_by_type
    # The reference's SQL reads a text timestamp: turned on for an adopted file.
    assert reference.sql_columns_enabled(sqlite3.connect(db))
    assert db_rows(db, OBSERVABILITY_SQL["hourly volume"])
    # Typed columns filled from the reference's fields, as at ingest.
    assert db_rows(db, "SELECT count(*) FROM discovery_metrics WHERE results_count IS NULL") == [
        (1,)
    ]
    # Opening again imports nothing twice.
    with TestClient(create_app(settings)):
        pass
    assert db_rows(db, "SELECT count(*) FROM metrics")[0][0] == ours
    # And the leftovers go with one command.
    monkeypatch.setenv("SQLITE_DB_PATH", str(db))
    assert cli(["db", "drop-reference"]) == 0
    tables = {r[0] for r in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if t.startswith("reference_") and t != "reference_import"}
    assert db_rows(db, "SELECT count(*) FROM metrics")[0][0] == ours


def test_an_interrupted_import_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "metrics.db"
    expected = reference_database(db)
    monkeypatch.setattr(reference, "CHUNK_ROWS", 7)
    calls = {"n": 0}
    real = reference.rollups.catch_up

    def failing(conn: sqlite3.Connection, pending: Any = None) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise sqlite3.OperationalError("disk I/O error")
        return real(conn, pending)

    monkeypatch.setattr(reference.rollups, "catch_up", failing)
    from metrics_service import storage
    from metrics_service.validation import Validator

    conn, _ = storage.open_database(db)
    with pytest.raises(sqlite3.OperationalError):
        reference.import_rows(conn, Validator(Settings(db_path=db)))
    done_before = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert 0 < done_before < expected["recent"]
    monkeypatch.setattr(reference.rollups, "catch_up", real)
    counts = reference.import_rows(conn, Validator(Settings(db_path=db)))
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == expected["recent"]
    assert counts["metrics"]["imported"] == expected["recent"] - done_before
    conn.close()


def test_a_file_of_this_service_is_not_taken_for_a_reference_one(tmp_path: Path) -> None:
    from metrics_service import storage

    conn, applied = storage.open_database(tmp_path / "m.db")
    assert applied and not reference.is_reference_schema(conn)
    conn.close()
    conn, applied = storage.open_database(tmp_path / "m.db")
    assert applied == [] and reference.adopt_schema(conn) == []
    conn.close()


# -- the SQL of the reference's docs/OBSERVABILITY.md --------------------------------------------

#: Its 15 SQL examples (the sixteenth, ``.tables``, is a sqlite3 shell command), one line each.
OBSERVABILITY_SQL = {
    "count by table": "SELECT 'auth_metrics' as table_name, COUNT(*) as count FROM auth_metrics"
    " UNION ALL SELECT 'tool_metrics', COUNT(*) FROM tool_metrics UNION ALL"
    " SELECT 'discovery_metrics', COUNT(*) FROM discovery_metrics UNION ALL"
    " SELECT 'metrics', COUNT(*) FROM metrics",
    "recent auth": "SELECT datetime(timestamp) as time, server, success, method, duration_ms,"
    " user_hash, error_code FROM auth_metrics ORDER BY timestamp DESC LIMIT 20",
    "auth success by server": "SELECT server, COUNT(*) as total, SUM(success) as successful,"
    " ROUND(100.0 * SUM(success) / COUNT(*), 2) as success_pct, ROUND(AVG(duration_ms), 2)"
    " as avg_ms FROM auth_metrics GROUP BY server ORDER BY total DESC",
    "hourly volume": "SELECT strftime('%Y-%m-%d %H:00', timestamp) as hour, COUNT(*) as requests"
    " FROM auth_metrics WHERE timestamp > datetime('now', '-24 hours') GROUP BY hour"
    " ORDER BY hour DESC",
    "recent tools": "SELECT datetime(timestamp) as time, tool_name, server_name, success,"
    " ROUND(duration_ms, 2) as dur_ms, method, client_name FROM tool_metrics"
    " ORDER BY timestamp DESC LIMIT 20",
    "tool usage": "SELECT tool_name, COUNT(*) as calls, SUM(success) as successful,"
    " ROUND(AVG(duration_ms), 2) as avg_ms, COUNT(DISTINCT client_name) as unique_clients"
    " FROM tool_metrics GROUP BY tool_name ORDER BY calls DESC",
    "clients": "SELECT client_name, client_version, COUNT(*) as calls, COUNT(DISTINCT tool_name)"
    " as unique_tools, COUNT(DISTINCT server_name) as unique_servers FROM tool_metrics"
    " WHERE client_name IS NOT NULL GROUP BY client_name, client_version ORDER BY calls DESC",
    "slowest tools": "SELECT tool_name, server_name, ROUND(duration_ms, 2) as duration_ms,"
    " datetime(timestamp) as time, success FROM tool_metrics ORDER BY duration_ms DESC LIMIT 20",
    "errors": "SELECT error_code, COUNT(*) as count, GROUP_CONCAT(DISTINCT tool_name) as"
    " affected_tools FROM tool_metrics WHERE success = 0 AND error_code IS NOT NULL"
    " GROUP BY error_code ORDER BY count DESC",
    "recent discovery": "SELECT datetime(timestamp) as time, query, results_count,"
    " ROUND(duration_ms, 2) as dur_ms, ROUND(embedding_time_ms, 2) as embed_ms,"
    " ROUND(faiss_search_time_ms, 2) as search_ms FROM discovery_metrics"
    " ORDER BY timestamp DESC LIMIT 20",
    "discovery performance": "SELECT COUNT(*) as total_queries, ROUND(AVG(results_count), 2) as"
    " avg_results, ROUND(AVG(duration_ms), 2) as avg_duration_ms, ROUND(AVG(embedding_time_ms), 2)"
    " as avg_embedding_ms, ROUND(AVG(faiss_search_time_ms), 2) as avg_search_ms"
    " FROM discovery_metrics",
    "methods": "SELECT method, COUNT(*) as count, COUNT(DISTINCT server_name) as servers_using,"
    " ROUND(AVG(duration_ms), 2) as avg_ms FROM tool_metrics WHERE method IS NOT NULL"
    " GROUP BY method ORDER BY count DESC",
    "daily clients": "SELECT DATE(timestamp) as date, COUNT(DISTINCT client_name) as"
    " unique_clients, COUNT(*) as total_calls FROM tool_metrics WHERE client_name IS NOT NULL"
    " GROUP BY DATE(timestamp) ORDER BY date DESC",
    "servers": "SELECT server_name, COUNT(*) as total_calls, SUM(success) as successful,"
    " ROUND(100.0 * SUM(success) / COUNT(*), 2) as success_rate, ROUND(AVG(duration_ms), 2) as"
    " avg_duration_ms, ROUND(MIN(duration_ms), 2) as min_ms, ROUND(MAX(duration_ms), 2) as max_ms"
    " FROM tool_metrics GROUP BY server_name ORDER BY total_calls DESC",
    "hour of day": "SELECT strftime('%H', timestamp) as hour_of_day, COUNT(*) as requests,"
    " ROUND(AVG(duration_ms), 2) as avg_duration_ms, ROUND(100.0 * SUM(success) / COUNT(*), 2) as"
    " success_rate FROM tool_metrics GROUP BY hour_of_day ORDER BY hour_of_day",
}


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This service's database after the reference clients' traffic, with the reference's
    ``timestamp`` column turned on by the CLI."""
    services = {b["service"] for b in ref.all_bodies().values()}
    keys = {s: f"key-{s}-0123456789abcdefghijklmnopq" for s in services}
    for s, k in keys.items():
        monkeypatch.setenv("METRICS_API_KEY_" + s.upper().replace("-", "_"), k)
    db = tmp_path / "m.db"
    with TestClient(create_app(Settings(db_path=db))) as c:
        for body in ref.all_bodies().values():
            r = c.post("/metrics", json=body, headers={"X-API-Key": keys[body["service"]]})
            assert r.status_code == 200, r.text
    monkeypatch.setenv("SQLITE_DB_PATH", str(db))
    assert cli(["db", "reference-sql", "on"]) == 0
    return db


def test_all_15_sql_examples_of_the_reference_docs_run(fed: Path) -> None:
    assert len(OBSERVABILITY_SQL) == 15
    results = {name: db_rows(fed, sql) for name, sql in OBSERVABILITY_SQL.items()}
    assert all(results.values()), [n for n, rows in results.items() if not rows]
    counts = dict(results["count by table"])
    assert counts["metrics"] == ref.metric_count(ref.all_bodies())
    assert counts["auth_metrics"] == db_rows(fed, "SELECT count(*) FROM auth_metrics")[0][0]
    # timestamp reads as the reference's text time: the last 24 hours hold every event.
    assert sum(n for _, n in results["hourly volume"]) == counts["auth_metrics"]
    now = datetime.now(UTC)
    assert results["recent auth"][0][0][:13] == now.strftime("%Y-%m-%d %H")[:13] or (
        results["recent auth"][0][0][:10] == now.strftime("%Y-%m-%d")
    )
    errors = {code: tools for code, _, tools in results["errors"]}
    assert "TimeoutError" in errors and "intelligent_tool_finder" in errors["TimeoutError"]
    # faiss_search_time_ms is our search_time_ms, under the reference's name.
    perf = results["discovery performance"][0]
    assert perf[0] == counts["discovery_metrics"] and perf[4] == pytest.approx(8.9)
    methods = {m for m, *_ in results["methods"]}
    assert {"initialize", "tools/list", "tools/call"} <= methods
    assert results["daily clients"][0][0] == now.strftime("%Y-%m-%d")


def test_the_timestamp_column_is_one_command_away_on_a_fresh_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metrics_service import storage

    db = tmp_path / "fresh.db"
    conn, _ = storage.open_database(db)
    # Off by default (it costs every insert); the queries that need it name it.
    needs_it = {n for n, sql in OBSERVABILITY_SQL.items() if "timestamp" in sql}
    assert len(needs_it) == 7
    for name, sql in OBSERVABILITY_SQL.items():
        if name in needs_it:
            with pytest.raises(sqlite3.OperationalError, match="no such column: timestamp"):
                conn.execute(sql)
        else:
            conn.execute(sql).fetchall()
    conn.close()
    monkeypatch.setenv("SQLITE_DB_PATH", str(db))
    assert cli(["db", "reference-sql", "status"]) == 0
    assert capsys.readouterr().out.strip().endswith("is off")
    assert cli(["db", "reference-sql", "on"]) == 0
    for sql in OBSERVABILITY_SQL.values():
        db_rows(db, sql)  # raises on a missing table or column
    assert cli(["db", "reference-sql", "off"]) == 0
    assert capsys.readouterr().out.strip().endswith("is off")
    with pytest.raises(sqlite3.OperationalError):
        db_rows(db, OBSERVABILITY_SQL["recent auth"])
