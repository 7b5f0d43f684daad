"""The command line: first run, start-up messages, bad settings, retention and stats commands."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests._helpers import ServiceProcess, cli, custom, payload


def test_first_run_creates_a_key_printed_once_that_the_quickstart_can_use(tmp_path: Path) -> None:
    svc = ServiceProcess(
        db_path=tmp_path / "m.db",
        env={},
        log_path=tmp_path / "log",
        args=["--first-run-key", "my-service"],
    )
    try:
        svc.start()
        match = re.search(r"export METRICS_KEY=(mcpm_\S+)", svc.log())
        assert match, svc.log()
        key = match.group(1)
        body = {
            "service": "my-service",
            "version": "1.0.0",
            "metrics": [
                {
                    "type": "auth_request",
                    "value": 1.0,
                    "duration_ms": 45.2,
                    "dimensions": {"success": True, "method": "jwt"},
                }
            ],
        }
        r = httpx.post(svc.url + "/metrics", json=body, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["accepted"] == 1
        svc.stop()
        svc.start()  # a second start prints no new key
        assert svc.log().count("export METRICS_KEY=") == 1
        assert "no ingest keys" not in svc.log()
    finally:
        svc.stop()


def test_serve_without_any_key_says_how_to_create_one(tmp_path: Path) -> None:
    svc = ServiceProcess(db_path=tmp_path / "m.db", env={}, log_path=tmp_path / "log")
    try:
        svc.start()
        assert "metrics-service keys create --service NAME" in svc.log()
    finally:
        svc.stop()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"METRICS_SERVICE_PORT": "eighty"}, "METRICS_SERVICE_PORT"),
        ({"METRICS_RATE_LIMIT": "0"}, "METRICS_RATE_LIMIT"),
        ({"METRICS_ACK_MODE": "sometimes"}, "METRICS_ACK_MODE"),
        ({"METRICS_RATE_LIMIT_STORAGE_URI": "mongodb://x"}, "METRICS_RATE_LIMIT_STORAGE_URI"),
        ({"METRICS_API_KEY_SHORT": "abc"}, "METRICS_API_KEY_SHORT"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_variable(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    svc = ServiceProcess(db_path=tmp_path / "m.db", env=env, log_path=tmp_path / "log")
    with pytest.raises(AssertionError, match="exited with 2"):
        svc.start()
    assert named in svc.log() and "Traceback" not in svc.log()


def test_retention_run_and_db_stats(service: ServiceProcess) -> None:
    service.env["METRICS_RETENTION_DAYS"] = "30"
    service.start()
    old = time.time() - 20 * 86_400
    body = payload(metrics=[{**custom(i), "timestamp": old} for i in range(4)] + [custom(9)])
    assert (
        httpx.post(
            service.url + "/metrics",
            json=body,
            headers={"X-API-Key": service.env["METRICS_API_KEY_SVC"]},
        ).status_code
        == 200
    )
    service.stop()
    dry = cli(
        service.db_path, "retention", "run", "--dry-run", env={"METRICS_RETENTION_DAYS": "10"}
    )
    assert "custom_metrics: would delete 4 rows older than 10 days" in dry.stdout, (
        dry.stdout + dry.stderr
    )
    stats = json.loads(cli(service.db_path, "db", "stats", "--json").stdout)
    assert stats["rows"]["custom_metrics"] == 5
    # With a 10-day default the four 20-day-old events go; the fresh one stays.
    done = cli(service.db_path, "retention", "run", env={"METRICS_RETENTION_DAYS": "10"})
    assert "custom_metrics: deleted 4 rows older than 10 days" in done.stdout, (
        done.stdout + done.stderr
    )
    assert (
        json.loads(cli(service.db_path, "db", "stats", "--json").stdout)["rows"]["custom_metrics"]
        == 1
    )


def test_retention_runs_at_start_up(service: ServiceProcess) -> None:
    service.env["METRICS_RETENTION_DAYS"] = "30"
    service.start()
    old = time.time() - 20 * 86_400
    body = payload(metrics=[{**custom(i), "timestamp": old} for i in range(3)] + [custom(9)])
    key = {"X-API-Key": service.env["METRICS_API_KEY_SVC"]}
    assert httpx.post(service.url + "/metrics", json=body, headers=key).status_code == 200
    service.stop()
    service.env["METRICS_RETENTION_DAYS"] = "10"
    service.start()
    from tests._helpers import db_rows, wait_for

    wait_for(
        lambda: db_rows(service.db_path, "SELECT count(*) FROM custom_metrics") == [(1,)],
        timeout_s=10,
    )
    assert "retention deleted 3 rows from custom_metrics" in service.log()


def test_json_logs_are_one_object_per_line(service: ServiceProcess) -> None:
    service.env["METRICS_LOG_FORMAT"] = "json"
    service.start()
    service.stop()
    lines = [line for line in service.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    messages = " ".join(r["message"] for r in records)
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert "starting: database" in messages and "Uvicorn running on http://127.0.0.1" in messages
    assert "stopped after" in messages
