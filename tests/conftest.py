from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    OTHER_KEY,
    RedisServer,
    ServiceProcess,
    start_redis,
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's METRICS_*/SQLITE_*/OTEL_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith(("METRICS_", "SQLITE_", "OTEL_")):
            monkeypatch.delenv(name)
    # Several apps run at once under xdist: let each Prometheus endpoint take a free port.
    monkeypatch.setenv("OTEL_PROMETHEUS_PORT", "0")


@pytest.fixture
def keyed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    monkeypatch.setenv("METRICS_API_KEY_OTHER", OTHER_KEY)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db_path=tmp_path / "m.db", admin_api_key=ADMIN_KEY)


@pytest.fixture
def client(settings: Settings, keyed_env: None) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    """A real service process; configure ``service.env`` and call ``start()``."""
    proc = ServiceProcess(
        db_path=tmp_path / "m.db",
        env={"METRICS_API_KEY_SVC": INGEST_KEY, "METRICS_ADMIN_API_KEY": ADMIN_KEY},
        log_path=tmp_path / "service.log",
    )
    yield proc
    proc.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path)
    yield server
    server.proc.terminate()
    server.proc.wait(10)
