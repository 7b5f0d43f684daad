"""The CLI against PostgreSQL: ``db copy-to-postgres`` moves a SQLite history over, then
``keys``, ``retention``, ``db stats`` and ``report`` work on the copy through
METRICS_DATABASE_URL exactly as they do on SQLite."""

from __future__ import annotations

import json
import time
from pathlib import Path

from metrics_service import Settings
from metrics_service.storage.sqlite import database as sqlite_db
from tests._analytics_seed import seed_rows
from tests._helpers import cli
from tests._servers import PG_PASSWORD


def test_copy_then_keys_retention_stats_and_report_on_postgres(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "m.db")
    now, parts = seed_rows(settings)
    conn, _ = sqlite_db.open_database(settings.db_path)
    for part in parts:
        sqlite_db.insert_rows(conn, [part])
    old = int((time.time() - 40 * 86_400) * 1000)
    conn.execute(
        "INSERT INTO custom_metrics (ts, received_at, service, service_version, value)"
        " VALUES (?, ?, 'svc', '1', 1.0)",
        (old, old),
    )
    sqlite_stats = json.loads(cli(settings.db_path, "db", "stats", "--json").stdout)
    conn.close()

    copied = cli(settings.db_path, "db", "copy-to-postgres", "--to", postgres_url)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert f"custom_metrics: {sqlite_stats['rows']['custom_metrics']} rows" in copied.stdout
    assert PG_PASSWORD not in copied.stdout + copied.stderr
    again = cli(settings.db_path, "db", "copy-to-postgres", "--to", postgres_url)
    assert again.returncode == 2 and "already holds" in again.stderr

    pg = {"METRICS_DATABASE_URL": postgres_url}
    stats = json.loads(cli(settings.db_path, "db", "stats", "--json", env=pg).stdout)
    assert stats["rows"] == sqlite_stats["rows"]
    assert PG_PASSWORD not in stats["path"]

    created = cli(settings.db_path, "keys", "create", "--service", "team-y", env=pg)
    assert created.returncode == 0, created.stderr
    listed = json.loads(cli(settings.db_path, "keys", "list", "--json", env=pg).stdout)
    key_id = next(k["id"] for k in listed if k["service"] == "team-y")
    revoked = cli(settings.db_path, "keys", "revoke", str(key_id), env=pg)
    assert revoked.returncode == 0, revoked.stderr
    active = json.loads(cli(settings.db_path, "keys", "list", "--json", env=pg).stdout)
    assert all(k["id"] != key_id for k in active)

    env = {**pg, "METRICS_RETENTION_DAYS": "30"}
    dry = cli(settings.db_path, "retention", "run", "--dry-run", env=env)
    assert "custom_metrics: would delete 1 rows older than 30 days" in dry.stdout, dry.stderr
    done = cli(settings.db_path, "retention", "run", env=env)
    assert "custom_metrics: deleted 1 rows older than 30 days" in done.stdout, done.stderr
    after = json.loads(cli(settings.db_path, "db", "stats", "--json", env=pg).stdout)
    assert after["rows"]["custom_metrics"] == sqlite_stats["rows"]["custom_metrics"] - 1

    span = ["--since", f"{now - 4 * 86_400:.3f}", "--until", f"{now:.3f}"]
    sqlite_report = cli(settings.db_path, "report", "--format", "json", *span)
    pg_report = cli(settings.db_path, "report", "--format", "json", *span, env=pg)
    assert pg_report.returncode == 0, pg_report.stderr
    assert json.loads(pg_report.stdout) == json.loads(sqlite_report.stdout)
    assert json.loads(pg_report.stdout)["summary"]["calls"] > 0
