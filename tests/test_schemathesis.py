"""schemathesis against the service's own OpenAPI schema (``/openapi.json``), every operation,
over real sockets to a real service process: each generated request (valid and invalid data) is
sent without a key, with a random key, and with the ingest, viewer and admin keys. No response is
a 5xx, and every response conforms to the schema: its status code is declared, its content type
and headers are the declared ones, and its body matches the declared model (errors included).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from metrics_service import Settings, create_app
from tests._helpers import ADMIN_KEY, INGEST_KEY, ServiceProcess

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: role -> key; filled in by the fixture (the viewer key is created through the admin API).
KEYS: dict[str, str | None] = {"none": None, "ingest": INGEST_KEY, "admin": ADMIN_KEY}
PROTECTED_KEY_IDS: set[int] = set()
STATUSES: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    service = ServiceProcess(
        db_path=tmp / "m.db",
        env={
            "METRICS_API_KEY_SVC": INGEST_KEY,
            "METRICS_ADMIN_API_KEY": ADMIN_KEY,
            # Thousands of requests from one address, most with wrong keys: neither limit may
            # turn the run into a run of 429s.
            "METRICS_RATE_LIMIT": "100000000",
            "METRICS_AUTH_FAILURE_LIMIT": "100000000",
            "METRICS_ANALYTICS_RATE_LIMIT": "100000000/minute",
            "METRICS_ROUTE_RATE_LIMIT": "100000000/minute",
            "METRICS_ROUTE_RATE_LIMIT_PER_ADDRESS": "100000000/minute",
            "METRICS_SQLITE_SYNCHRONOUS": "normal",
        },
        log_path=tmp / "service.log",
    ).start()
    try:
        viewer = httpx.post(
            service.url + "/admin/keys", json={"role": "viewer"}, headers={"X-API-Key": ADMIN_KEY}
        )
        KEYS["viewer"] = viewer.json()["key"]
        listing = httpx.get(service.url + "/admin/keys", headers={"X-API-Key": ADMIN_KEY}).json()
        PROTECTED_KEY_IDS.update(k["id"] for k in listing)
        assert httpx.get(service.url + "/openapi.json").json() == SCHEMA
        yield service.url
        assert "unhandled error" not in service.log(), service.log()[-3000:]
    finally:
        service.stop()


def _schema() -> dict[str, Any]:
    # The document the service serves, built in-process without starting anything; the fixture
    # checks that the running service serves exactly this.
    app = create_app(
        Settings(db_path=Path(tempfile.gettempdir()) / "unused.db", admin_api_key=ADMIN_KEY)
    )
    return app.openapi()


SCHEMA = _schema()
schema = schemathesis.openapi.from_dict(SCHEMA)


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_with_and_without_keys(
    case: Any, service_url: str, record_property: Callable[[str, object], None]
) -> None:
    for role, key in KEYS.items():
        if (
            role == "admin"
            and case.method == "DELETE"
            and (case.path_parameters or {}).get("key_id") in PROTECTED_KEY_IDS
        ):
            continue  # revoking the keys this test runs with would end the "with keys" half
        headers = {"X-API-Key": key} if key is not None else None
        response = case.call_and_validate(base_url=service_url, headers=headers, checks=CHECKS)
        STATUSES[(role, response.status_code)] += 1
    record_property("requests_by_role_and_status", dict(STATUSES))
