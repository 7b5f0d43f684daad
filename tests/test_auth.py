"""Keys and authentication: env reconciliation across restarts (a revoked key stays revoked), CLI
changes reaching a running service, the failed-auth throttle and trusted proxies; on SQLite and
PostgreSQL (``BACKENDS``, tests/conftest.py)."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    OTHER_KEY,
    ServiceProcess,
    cli,
    payload,
    wait_for,
)
from tests._servers import stored_rows

#: Keys live in the database: the same behaviour on either backend.
BACKENDS = ("sqlite", "postgresql")

NEW_KEY = "rotated-ingest-key-0123456789abcdefghijklmn"


def post(url: str, key: str, service: str = "svc") -> int:
    return httpx.post(
        url + "/metrics", json=payload(service=service), headers={"X-API-Key": key}
    ).status_code


def keys_cli(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``metrics-service keys ARGS`` on the database of ``service``."""
    url = {k: v for k, v in service.env.items() if k == "METRICS_DATABASE_URL"}
    return cli(service.db_path, "keys", *args, env=url)


def test_env_keys_are_reconciled_at_start(service: ServiceProcess) -> None:
    service.env["METRICS_API_KEY_BILLING"] = "billing-key-0123456789abcdefghijklmnop"
    service.start()
    assert post(service.url, INGEST_KEY) == 200
    assert post(service.url, "billing-key-0123456789abcdefghijklmnop", "billing") == 200
    service.stop()

    # Restart with svc's key changed and billing's variable removed.
    service.env["METRICS_API_KEY_SVC"] = NEW_KEY
    del service.env["METRICS_API_KEY_BILLING"]
    service.start()
    assert post(service.url, NEW_KEY) == 200
    assert post(service.url, INGEST_KEY) == 401, "the replaced key must stop working"
    assert post(service.url, "billing-key-0123456789abcdefghijklmnop", "billing") == 401, (
        "a removed key is revoked"
    )
    assert "1 kept, 1 added, 2 revoked" in service.log()
    rows = stored_rows(
        service,
        "SELECT service, revoked_at IS NULL FROM api_keys WHERE source = 'env' AND role = "
        "'ingest' ORDER BY id",
    )
    assert rows == [("svc", 0), ("billing", 0), ("svc", 1)]


def test_cli_keys_reach_a_running_service_within_seconds(service: ServiceProcess) -> None:
    service.env["METRICS_KEY_RELOAD_INTERVAL_S"] = "0.5"
    service.start()
    created = keys_cli(service, "create", "--service", "registry", "--rate-limit", "50")
    assert created.returncode == 0, created.stderr
    secret = re.search(r"(mcpm_\S+)", created.stdout).group(1)  # type: ignore[union-attr]
    wait_for(lambda: post(service.url, secret, "registry") == 200, timeout_s=5)

    listing = keys_cli(service, "list")
    assert "registry" in listing.stdout and "50" in listing.stdout
    assert secret not in listing.stdout and secret[:20] not in listing.stdout
    key_id = next(line.split()[0] for line in listing.stdout.splitlines() if " registry " in line)

    revoked = keys_cli(service, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: post(service.url, secret, "registry") == 401, timeout_s=5)
    assert keys_cli(service, "revoke", "424242").returncode == 1


def test_a_revoked_env_key_stays_revoked_across_restarts(
    settings: Settings, keyed_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(settings)) as c:
        assert (
            c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY}).status_code == 200
        )
        keys = c.get("/admin/keys", headers={"X-API-Key": ADMIN_KEY}).json()
        (env_key,) = [k for k in keys if k["service"] == "svc" and k["source"] == "env"]
        revoked = c.delete(f"/admin/keys/{env_key['id']}", headers={"X-API-Key": ADMIN_KEY})
        assert revoked.status_code == 200, revoked.text
    # The variable still holds the key: the restart must not bring it back.
    caplog.set_level(logging.WARNING, logger="metrics_service.auth")
    with TestClient(create_app(settings)) as c:
        assert (
            c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY}).status_code == 401
        )
        assert (
            c.post(
                "/metrics", json=payload(service="other"), headers={"X-API-Key": OTHER_KEY}
            ).status_code
            == 200
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("METRICS_API_KEY_SVC" in w and "stays revoked" in w for w in warnings), warnings
    assert stored_rows(
        settings, f"SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = {int(env_key['id'])}"
    ) == [(1,)]


def _auth_app(make_settings: Callable[..., Settings], **settings: Any) -> Any:
    return create_app(make_settings(auth_failure_limit_per_min=3, **settings))


def _guess(c: TestClient, forwarded_for: str | None = None, path: str = "/metrics") -> int:
    headers = {"X-API-Key": "mcpm_" + "G" * 43}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return c.post(path, json=payload(), headers=headers).status_code


def test_a_valid_key_passes_the_failed_auth_throttle_of_its_address(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    with TestClient(_auth_app(make_settings), client=("203.0.113.7", 40000)) as c:
        assert [_guess(c) for _ in range(5)] == [401, 401, 401, 429, 429]
        assert (
            c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY}).status_code == 200
        )
        assert _guess(c) == 429  # the bad client on that address is still refused


@pytest.mark.parametrize("path", ["/metrics", "/v1/traces"])
def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(
    make_settings: Callable[..., Settings], keyed_env: None, path: str
) -> None:
    proxy = ("10.1.2.3", 40000)
    with TestClient(
        _auth_app(make_settings, trusted_proxies="10.0.0.0/8, 192.0.2.1"), client=proxy
    ) as c:
        # Behind the proxy, each client has its own budget of failures.
        assert [_guess(c, "198.51.100.1", path) for _ in range(4)] == [401, 401, 401, 429]
        assert _guess(c, "198.51.100.2", path) == 401
        # The client's own X-Forwarded-For entries left of it do not help it: the rightmost
        # entry that is not a trusted proxy is the client.
        assert _guess(c, "198.51.100.9, 198.51.100.1", path) == 429
        assert _guess(c, "198.51.100.1, 192.0.2.1", path) == 429  # through a second proxy
    # A new app on the same database: the failure budgets are the app's own (in memory).
    with TestClient(_auth_app(make_settings, trusted_proxies="192.0.2.1"), client=proxy) as c:
        # From a peer that is not a trusted proxy, the header is the client's word: ignored.
        codes = [_guess(c, f"198.51.100.{i}") for i in range(4)]
        assert codes == [401, 401, 401, 429]


def test_a_bearer_key_is_the_same_key_on_every_endpoint(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    """``Authorization: Bearer <key>`` (the OTLP exporters' form) works where X-API-Key does;
    another scheme presents no key and the 401 says which header to send."""
    settings = make_settings()
    with TestClient(_auth_app(make_settings)) as c:
        bearer = {"Authorization": f"Bearer {INGEST_KEY}"}
        r = c.post("/metrics", json=payload(), headers=bearer)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert c.get("/rate-limit", headers=bearer).json()["service"] == "svc"
        # X-API-Key wins when both are sent: the Bearer token here is not a key.
        both = {"X-API-Key": INGEST_KEY, "Authorization": "Bearer not-a-key"}
        assert c.post("/metrics", json=payload(), headers=both).status_code == 200
        for headers in ({"Authorization": f"Basic {INGEST_KEY}"}, {"Authorization": "Bearer "}):
            r = c.post("/metrics", json=payload(), headers=headers)
            assert r.status_code == 401
            assert "X-API-Key" in r.json()["error"]["message"]
            assert r.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key", Bearer'
        r = c.get("/analytics/summary", headers={"Authorization": "Bearer wrong-wrong-wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "unknown or revoked API key"
    assert stored_rows(settings, "SELECT count(*) FROM custom_metrics") == [(2,)]
