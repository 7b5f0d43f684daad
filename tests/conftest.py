from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    OTHER_KEY,
    RedisServer,
    ServiceProcess,
    require_binary,
    start_redis,
)

# PostgreSQL, HAProxy and replica fixtures (postgres_cluster, postgres_url, postgres_server).
pytest_plugins = ["tests._servers"]


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): about SQLite itself; runs on SQLite only in a BACKENDS module",
    )


#: The fixtures whose database a module's ``BACKENDS`` chooses.
_ON_A_BACKEND = {"settings", "make_settings", "service"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module whose behaviour does not depend on the backend says ``BACKENDS = ("sqlite",
    "postgresql")``: its tests that use ``settings``, ``make_settings``, ``client`` or
    ``service`` run once on each, the PostgreSQL run on a new database of a real server
    (tests/_servers.py), copied from one migrated once per test process. A test that is about
    one backend only says so with ``@pytest.mark.sqlite_only("why")``."""
    backends = getattr(metafunc.module, "BACKENDS", None)
    if not backends or not _ON_A_BACKEND & set(metafunc.fixturenames):
        return
    marker = metafunc.definition.get_closest_marker("sqlite_only")
    if marker is not None:
        assert marker.args, f"{metafunc.definition.nodeid}: sqlite_only needs its reason"
        backends = ("sqlite",)
    metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """``METRICS_DATABASE_URL`` of the test's backend: None for SQLite (``SQLITE_DB_PATH``)."""
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_migrated_url"))
    return None


@pytest.fixture
def make_settings(
    tmp_path: Path, database_url: str | None, backend: str, request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    """``Settings`` on the test's database (SQLite file or PostgreSQL), with overrides;
    ``new_database=True`` for another, empty one (another file, or another PostgreSQL
    database)."""
    made = [0]

    def make(*, new_database: bool = False, **overrides: Any) -> Settings:
        path, url = tmp_path / "m.db", database_url
        if new_database:
            made[0] += 1
            path = tmp_path / f"m{made[0]}.db"
            if backend == "postgresql":
                url = request.getfixturevalue("postgres_databases")()
        base: dict[str, Any] = {"db_path": path, "admin_api_key": ADMIN_KEY, "database_url": url}
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings, keyed_env: None) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def service(tmp_path: Path, database_url: str | None) -> Iterator[ServiceProcess]:
    """A real service process; configure ``service.env`` and call ``start()``."""
    env = {"METRICS_API_KEY_SVC": INGEST_KEY, "METRICS_ADMIN_API_KEY": ADMIN_KEY}
    if database_url:
        env["METRICS_DATABASE_URL"] = database_url
    proc = ServiceProcess(db_path=tmp_path / "m.db", env=env, log_path=tmp_path / "service.log")
    yield proc
    proc.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path)
    yield server
    server.proc.terminate()
    server.proc.wait(10)


#: Debian's chromium, headless, with nothing of its own going out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    """A real Chromium (Debian's package) driven by playwright, without `playwright install`."""
    binary = require_binary("chromium", "chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no `playwright install`)"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        yield b
        b.close()
