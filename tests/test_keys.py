"""Keys: env reconciliation across restarts, CLI changes reaching a running service, no plaintext
anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    ServiceProcess,
    clean_env,
    db_rows,
    payload,
    wait_for,
)

NEW_KEY = "rotated-ingest-key-0123456789abcdefghijklmn"


def post(url: str, key: str, service: str = "svc") -> int:
    return httpx.post(
        url + "/metrics", json=payload(service=service), headers={"X-API-Key": key}
    ).status_code


def cli(
    db: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "SQLITE_DB_PATH": str(db), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "metrics_service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    rows = db_rows(
        service.db_path,
        "SELECT service, revoked_at IS NULL FROM api_keys WHERE source = 'env' AND role = "
        "'ingest' ORDER BY id",
    )
    assert rows == [("svc", 0), ("billing", 0), ("svc", 1)]


def test_cli_keys_reach_a_running_service_within_seconds(service: ServiceProcess) -> None:
    service.env["METRICS_KEY_RELOAD_INTERVAL_S"] = "0.5"
    service.start()
    created = cli(service.db_path, "keys", "create", "--service", "registry", "--rate-limit", "50")
    assert created.returncode == 0, created.stderr
    secret = re.search(r"(mcpm_\S+)", created.stdout).group(1)  # type: ignore[union-attr]
    wait_for(lambda: post(service.url, secret, "registry") == 200, timeout_s=5)

    listing = cli(service.db_path, "keys", "list")
    assert "registry" in listing.stdout and "50" in listing.stdout
    assert secret not in listing.stdout and secret[:20] not in listing.stdout
    key_id = next(line.split()[0] for line in listing.stdout.splitlines() if " registry " in line)

    revoked = cli(service.db_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: post(service.url, secret, "registry") == 401, timeout_s=5)
    assert cli(service.db_path, "keys", "revoke", "424242").returncode == 1


def test_keys_never_appear_in_logs_responses_or_the_database(service: ServiceProcess) -> None:
    service.start()
    with httpx.Client(base_url=service.url) as c:
        c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY})
        c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY + "x"})
        created = c.post(
            "/admin/keys", json={"service": "svc"}, headers={"X-API-Key": ADMIN_KEY}
        ).json()["key"]
        listing = c.get("/admin/keys", headers={"X-API-Key": ADMIN_KEY}).text
    service.stop()
    for secret in (INGEST_KEY, ADMIN_KEY, created):
        assert secret not in service.log()
        assert secret not in listing
        for path in service.db_path.parent.glob("m.db*"):
            assert secret.encode() not in path.read_bytes(), path
