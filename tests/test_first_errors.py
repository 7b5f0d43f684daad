"""The errors a newcomer meets first say what to do: a busy port, the Prometheus habit of
``GET /metrics`` on the API port, and unix milliseconds where seconds are expected."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from tests._helpers import INGEST_KEY, clean_env, custom, payload


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on, for the duration of the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metrics_service", "serve"],
        env={
            **clean_env(),
            "SQLITE_DB_PATH": str(tmp_path / "m.db"),
            "METRICS_SERVICE_HOST": "127.0.0.1",
            "OTEL_PROMETHEUS_HOST": "127.0.0.1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("variable", ["METRICS_SERVICE_PORT", "OTEL_PROMETHEUS_PORT"])
def test_a_busy_port_is_one_line_naming_the_port_and_its_variable_and_exit_2(
    tmp_path: Path, busy_port: int, variable: str
) -> None:
    env = {"METRICS_SERVICE_PORT": "0", "OTEL_PROMETHEUS_PORT": "0", variable: str(busy_port)}
    done = _serve(tmp_path, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(busy_port) in lines[0] and variable in lines[0] and "in use" in lines[0]
    assert "Traceback" not in done.stderr


def test_the_same_port_for_api_and_scrape_is_refused_naming_both(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = _serve(tmp_path, METRICS_SERVICE_PORT=port, OTEL_PROMETHEUS_PORT=port)
    assert done.returncode == 2
    assert "METRICS_SERVICE_PORT" in done.stderr and "OTEL_PROMETHEUS_PORT" in done.stderr


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    settings = Settings(db_path=tmp_path / "m.db", otel_prometheus_port=0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_get_metrics_on_the_api_port_says_where_prometheus_scrapes(app: TestClient) -> None:
    r = app.get("/metrics")
    assert r.status_code == 405
    error = r.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert "POST" in error["message"] and "OTEL_PROMETHEUS_PORT" in error["message"]
    assert "/metrics" in error["message"] and "http://127.0.0.1:" in error["message"]


def test_get_metrics_with_prometheus_off_says_it_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(db_path=tmp_path / "m.db", otel_prometheus_enabled=False)
    with TestClient(create_app(settings)) as c:
        error = c.get("/metrics").json()["error"]
    assert "OTEL_PROMETHEUS_ENABLED=false" in error["message"]


def test_unix_milliseconds_get_a_hint_and_seconds_are_accepted(app: TestClient) -> None:
    now = time.time()
    r = app.post(
        "/metrics",
        headers={"X-API-Key": INGEST_KEY},
        json=payload(
            metrics=[{**custom(1.0), "timestamp": now * 1000}, {**custom(2.0), "timestamp": now}]
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1
    [error] = body["errors"]
    assert error["index"] == 0 and error["field"] == "metrics[0].timestamp"
    assert error["rule"] == "max_future_skew" and "milliseconds" in error["message"]


def test_a_time_far_in_the_future_that_is_not_milliseconds_gets_no_hint(app: TestClient) -> None:
    r = app.post(
        "/metrics",
        headers={"X-API-Key": INGEST_KEY},
        json=payload(metrics=[{**custom(1.0), "timestamp": time.time() + 10 * 86400}]),
    )
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert error["rule"] == "max_future_skew" and "milliseconds" not in error["message"]
