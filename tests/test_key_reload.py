"""A key created with the CLI while the service runs works on its first request: an unknown key
makes the service reload its keys once before refusing it, at most once a second. On SQLite and
PostgreSQL (``BACKENDS``, tests/conftest.py)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.auth import RELOAD_ON_DEMAND_INTERVAL_S
from tests._helpers import ServiceProcess, clean_env, payload

#: Keys live in the database, whichever it is.
BACKENDS = ("sqlite", "postgresql")


def _create_key(on: ServiceProcess, service: str) -> str:
    """``metrics-service keys create`` on the database of the service ``on``."""
    url = {k: v for k, v in on.env.items() if k == "METRICS_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "metrics_service", "keys", "create", "--service", service],
        env={**clean_env(), "SQLITE_DB_PATH": str(on.db_path), **url},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    match = re.search(r"mcpm_\S+", done.stdout)
    assert match, done.stdout
    return match.group(0)


def test_a_key_created_with_the_cli_works_on_its_first_request(service: ServiceProcess) -> None:
    # The periodic reload is an hour away: only the reload on demand can make the key known.
    service.env["METRICS_KEY_RELOAD_INTERVAL_S"] = "3600"
    service.start()
    key = _create_key(service, "fresh")
    r = httpx.post(
        service.url + "/metrics", json=payload("fresh"), headers={"X-API-Key": key}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    # A key nobody created is still refused, with the usual 401.
    r = httpx.post(
        service.url + "/metrics",
        json=payload("fresh"),
        headers={"X-API-Key": "mcpm_" + "x" * 43},
        timeout=10,
    )
    assert r.status_code == 401


def test_unknown_keys_reload_at_most_once_a_second(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", "mcpm_" + "s" * 43)
    settings = make_settings(key_reload_interval_s=3600, auth_failure_limit_per_min=10_000)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.metrics  # type: ignore[attr-defined]
        real = state.authenticator.reload
        calls: list[float] = []

        async def counting() -> None:
            calls.append(time.monotonic())
            await real()

        state.authenticator.reload = counting
        started = time.monotonic()
        statuses = [
            c.post("/metrics", json=payload(), headers={"X-API-Key": f"mcpm_bad{i}"}).status_code
            for i in range(60)
        ]
        elapsed = time.monotonic() - started
    assert set(statuses) == {401}
    assert 1 <= len(calls) <= 1 + elapsed / RELOAD_ON_DEMAND_INTERVAL_S
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= RELOAD_ON_DEMAND_INTERVAL_S for gap in gaps), gaps
