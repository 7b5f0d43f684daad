"""Security: SQL injection on every parameter that reaches SQL, key guessing and key scope, keys
never in plain text (log, responses, database file), security headers, CORS off, admin off,
loopback by default.

Already covered elsewhere: injection on admin table names, key ids and key services and in
ingest values (tests/test_admin.py); failed-auth throttling of a burst (tests/test_ratelimit.py);
label cardinality (tests/test_telemetry_cardinality.py). The keys-in-plain-text test here widens
tests/test_auth.py's: debug logging, viewer and revoked keys, wrong guesses, every response, the
scrape, the files while running and after stopping, and the secret part past the listed prefix.

On SQLite and PostgreSQL (``BACKENDS``, tests/conftest.py): the SQL that injections aim at is
each backend's own.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.auth import hash_key
from tests._helpers import ADMIN_KEY, INGEST_KEY, INJECTIONS, ServiceProcess, payload
from tests._servers import PostgresServer, on_postgres, stored_rows
from tests._traffic import auth, discovery, protocol, tool

#: Injections change nothing and leak nothing on either backend.
BACKENDS = ("sqlite", "postgresql")

H = {"X-API-Key": INGEST_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}
MORE_INJECTIONS = [
    *INJECTIONS,
    "x' UNION SELECT key_hash, key_hash, key_hash FROM api_keys --",
    "' || (SELECT key_hash FROM api_keys LIMIT 1) || '",
    "1) OR (1=1",
    "%",
    "_",
    "\\",
    "x\x00y",
    "'; ATTACH DATABASE '/tmp/pwn.db' AS pwn; --",
]
FILTERS = ("service", "server", "tool", "client", "tenant")


def _snapshot(db: Any) -> dict[str, Any]:
    """What an injection could change: the schema, the row counts, the keys."""
    if on_postgres(db):
        relations = (
            "SELECT c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = 'public' ORDER BY 1"
        )
        schema = stored_rows(db, relations) + stored_rows(
            db,
            "SELECT table_name, column_name, data_type, is_nullable FROM"
            " information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        )
        tables = [name for name, kind in stored_rows(db, relations) if kind in ("r", "p")]
    else:
        schema = stored_rows(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
        tables = [
            name
            for (name,) in stored_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
    return {
        "schema": schema,
        "rows": {t: stored_rows(db, f'SELECT count(*) FROM "{t}"')[0][0] for t in tables},
        "keys": stored_rows(db, "SELECT id, key_hash, revoked_at FROM api_keys ORDER BY id"),
        "policies": stored_rows(db, "SELECT * FROM retention_policies ORDER BY table_name"),
    }


def _injections(backend: str) -> list[str]:
    """``MORE_INJECTIONS``, on every backend (U+0000 included: it is refused with rule
    ``charset`` before any backend sees it)."""
    return list(MORE_INJECTIONS)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The suite's settings, with rate limits (ingest and route) the injection matrix cannot
    reach, and SQLite's rollups folded in each commit: a fold in the background between the
    snapshots before and after would change the rollup tables' row counts."""
    return make_settings(
        rate_limit_per_min=1_000_000,
        analytics_rate_limit="1000000/minute",
        route_rate_limit_per_address="1000000/minute",
        rollup_fold_interval_s=0,
    )


@pytest.fixture
def seeded(client: TestClient, settings: Settings) -> TestClient:
    metrics = [
        auth(),
        auth(False, "oauth"),
        tool("search"),
        tool("fetch", client="cursor"),
        discovery(),
        protocol(),
    ]
    r = client.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200 and r.json()["accepted"] == len(metrics)
    return client


def _analytics_routes(schema: dict[str, Any]) -> dict[str, list[str]]:
    return {
        path: [p["name"] for p in ops["get"].get("parameters", []) if p["in"] == "query"]
        for path, ops in schema["paths"].items()
        if path.startswith("/analytics/") and "get" in ops
    }


def test_sql_injection_in_every_query_parameter_changes_nothing_and_leaks_nothing(
    seeded: TestClient,
    settings: Settings,
    backend: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Every query parameter of every analytics view, from the service's own OpenAPI schema,
    with each injection: 200 or 422, never a 5xx; a filter that is an injection matches
    nothing (as any unknown value would); no key hash comes back; the database is unchanged."""
    client = seeded
    routes = _analytics_routes(client.get("/openapi.json").json())
    hashes = [h for (h,) in stored_rows(settings, "SELECT key_hash FROM api_keys")]
    before = _snapshot(settings)
    window = {"since": str(int(time.time()) - 3600), "until": str(int(time.time()) + 60)}
    tried = Counter[int]()
    for path, names in routes.items():
        for name in names:
            baseline = None
            if name in FILTERS:
                baseline = client.get(path, params={**window, name: "no-such-value"}, headers=ADMIN)
                assert baseline.status_code in (200, 422), (path, baseline.text)
            for value in _injections(backend):
                r = client.get(path, params={**window, name: value}, headers=ADMIN)
                tried[r.status_code] += 1
                assert r.status_code in (200, 422), (path, name, value, r.status_code, r.text[:300])
                assert not any(h in r.text for h in hashes)
                if (
                    baseline is not None and baseline.status_code == 422
                ):  # a filter this view has not
                    assert r.status_code == 422
                elif r.status_code == 200 and baseline is not None:
                    assert _without(r.json(), value) == _without(
                        baseline.json(), "no-such-value"
                    ), (path, name, value)
    assert len(routes) >= 5 and tried[200] > 0 and tried[422] > 0, (routes, tried)
    record_property("injections_by_status", dict(tried))
    assert _snapshot(settings) == before


def _without(body: Any, value: str) -> Any:
    """The body with the filter's echo (any string equal to ``value``) taken out."""
    if isinstance(body, dict):
        return {k: _without(v, value) for k, v in body.items()}
    if isinstance(body, list):
        return [_without(v, value) for v in body]
    return "<value>" if body == value else body


def test_sql_injection_in_admin_bodies_and_the_key_header(
    client: TestClient, settings: Settings, backend: str
) -> None:
    before = _snapshot(settings)
    for value in _injections(backend):
        # As a key: looked up by hash in memory, never in SQL.
        assert client.get(
            "/admin/keys", headers={"X-API-Key": value.replace("\x00", "")}
        ).status_code in (401, 429)
        # Where a string is free text it is stored verbatim; where it must be a number or a
        # choice it is refused.
        r = client.post("/admin/keys", json={"service": "svc", "description": value}, headers=ADMIN)
        if "\x00" in value:  # U+0000 is refused on every backend (PostgreSQL cannot hold it)
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"].endswith(
                "description"
            )
        else:
            assert r.status_code == 201 and r.json()["description"] == value
        for body in (
            {"service": "svc", "role": value},
            {"service": "svc", "rate_limit_per_min": value},
        ):
            assert client.post("/admin/keys", json=body, headers=ADMIN).status_code == 422
        r = client.put(
            "/admin/retention/policies/custom_metrics",
            json={"retention_days": value},
            headers=ADMIN,
        )
        assert r.status_code == 422
    descriptions = {d for (d,) in stored_rows(settings, "SELECT description FROM api_keys") if d}
    assert descriptions == {v for v in _injections(backend) if "\x00" not in v}
    after = _snapshot(settings)
    assert after["schema"] == before["schema"] and after["policies"] == before["policies"]
    assert after["keys"][: len(before["keys"])] == before["keys"]
    # The ingest values that become typed columns are data too.
    evil = MORE_INJECTIONS[1]
    metrics = [
        tool(evil, server=evil, client=evil, session_id=evil),
        auth(method=evil, server=evil, user_hash=evil),
    ]
    r = client.post(
        "/metrics", json=payload(metrics=metrics, instance_id=evil, version=evil[:64]), headers=H
    )
    assert r.status_code == 200 and r.json()["accepted"] == 2
    assert stored_rows(
        settings, "SELECT tool_name, server_name, client_name, instance_id FROM tool_metrics"
    ) == [(evil, evil, evil, evil)]
    assert stored_rows(settings, "SELECT method, server, user_hash FROM auth_metrics") == [
        (evil, evil, evil)
    ]


# -- keys ----------------------------------------------------------------------------------------


def test_every_admin_and_analytics_endpoint_refuses_the_wrong_role(client: TestClient) -> None:
    """From the OpenAPI schema: an ingest key gets 403 on every admin and analytics operation,
    a viewer key on every admin operation and on ingest, the admin key on ingest."""
    viewer = client.post("/admin/keys", json={"role": "viewer"}, headers=ADMIN).json()["key"]
    schema = client.get("/openapi.json").json()
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, ops in schema["paths"].items()
        for method in ops
        if path.startswith(("/admin/", "/analytics/"))
    ]
    assert len(operations) >= 12
    for method, path in operations:
        r = client.request(method, path, headers=H, json={})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (
            method,
            path,
            r.text,
        )
        if path.startswith("/admin/"):
            assert (
                client.request(method, path, headers={"X-API-Key": viewer}, json={}).status_code
                == 403
            )
        assert client.request(method, path, json={}).status_code == 401
    assert client.post("/metrics", json=payload(), headers={"X-API-Key": viewer}).status_code == 403
    assert client.post("/metrics", json=payload(), headers=ADMIN).status_code == 403
    # And an ingest key reports only for its own service.
    assert client.post("/metrics", json=payload(service="other"), headers=H).status_code == 403


async def _burst(url: str, n: int, key: str, local_address: str) -> Counter[int]:
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, transport=transport, limits=limits) as c:
        await asyncio.gather(*(c.get("/health") for _ in range(8)))
        responses = await asyncio.gather(
            *(c.post("/metrics", json=payload(), headers={"X-API-Key": key}) for _ in range(n))
        )
    return Counter(r.status_code for r in responses)


def test_key_guessing_burst_is_throttled_for_that_address_only(service: ServiceProcess) -> None:
    service.env["METRICS_AUTH_FAILURE_LIMIT"] = "20"
    service.start()
    guesses = asyncio.run(_burst(service.url, 300, "mcpm_" + "A" * 43, "127.0.0.1"))
    assert guesses == {401: 20, 429: 280}
    # Other guesses from that address stay refused, from another address they are 401 again;
    # the right key passes from both (a shared NAT address must not lock out valid clients).
    assert asyncio.run(_burst(service.url, 3, "mcpm_" + "B" * 43, "127.0.0.1")) == {429: 3}
    assert asyncio.run(_burst(service.url, 3, "mcpm_" + "B" * 43, "127.0.0.2")) == {401: 3}
    assert asyncio.run(_burst(service.url, 2, INGEST_KEY, "127.0.0.1")) == {200: 2}
    assert asyncio.run(_burst(service.url, 5, INGEST_KEY, "127.0.0.2")) == {200: 5}
    assert stored_rows(service, "SELECT count(*) FROM custom_metrics") == [(7,)]


def test_forwarded_for_from_an_untrusted_local_peer_buys_no_fresh_budget(
    service: ServiceProcess,
) -> None:
    """With no METRICS_TRUSTED_PROXIES, a client on the same host cannot name another address
    in X-Forwarded-For to escape the failed-auth throttle (uvicorn's own proxy-header handling,
    off, would trust 127.0.0.1 and take the header's word)."""
    service.env["METRICS_AUTH_FAILURE_LIMIT"] = "5"
    service.start()
    guess = {"X-API-Key": "mcpm_" + "F" * 43}
    codes = [
        httpx.post(
            service.url + "/metrics",
            json=payload(),
            headers={**guess, "X-Forwarded-For": f"198.51.100.{i}"},
        ).status_code
        for i in range(8)
    ]
    assert codes == [401] * 5 + [429] * 3


def _secret_parts(key: str) -> list[str]:
    """The key, and its secret part past the prefix that listings show."""
    return [key, key[11:]]


def _database_files(service: ServiceProcess, request: pytest.FixtureRequest) -> bytes:
    """The bytes of the files that hold ``service``'s database: SQLite's file, WAL and shared
    memory; or, after a checkpoint, the PostgreSQL database's own data files."""
    if not on_postgres(service):
        return b"".join(p.read_bytes() for p in service.db_path.parent.glob("m.db*"))
    cluster: PostgresServer = request.getfixturevalue("postgres_cluster")
    database = service.env["METRICS_DATABASE_URL"].rsplit("/", 1)[1]
    oid = cluster.psql(f"SELECT oid FROM pg_database WHERE datname = '{database}'")
    cluster.psql("CHECKPOINT")  # every committed page written to the data files
    return b"".join(p.read_bytes() for p in (cluster.data / "base" / oid).iterdir())


def test_keys_never_appear_in_plain_text_in_logs_responses_or_the_database(
    service: ServiceProcess, request: pytest.FixtureRequest
) -> None:
    wrong = "mcpm_" + "Zx9" * 14
    service.env.update(METRICS_LOG_LEVEL="debug", METRICS_KEY_RELOAD_INTERVAL_S="0.2")
    service.start()
    seen: list[str] = []  # every response the service sent, but the one that shows a new key

    def record(r: httpx.Response) -> httpx.Response:
        seen.append(f"{r.status_code} {r.headers} {r.text}")
        return r

    with httpx.Client(base_url=service.url, timeout=10) as c:
        created = c.post(
            "/admin/keys", json={"service": "svc", "description": "rotating"}, headers=ADMIN
        )
        assert created.status_code == 201
        new_key, new_id = created.json()["key"], created.json()["id"]
        viewer = c.post("/admin/keys", json={"role": "viewer"}, headers=ADMIN).json()["key"]
        record(c.get("/admin/keys", headers=ADMIN))
        for key in (INGEST_KEY, new_key):
            assert (
                record(
                    c.post("/metrics", json=payload(metrics=[tool()]), headers={"X-API-Key": key})
                ).status_code
                == 200
            )
            assert (
                record(
                    c.post("/metrics", json=payload(service="other"), headers={"X-API-Key": key})
                ).status_code
                == 403
            )
            assert record(c.get("/admin/db/stats", headers={"X-API-Key": key})).status_code == 403
            assert record(c.get("/rate-limit", headers={"X-API-Key": key})).status_code == 200
        assert record(c.get("/analytics/summary", headers={"X-API-Key": viewer})).status_code == 200
        assert (
            record(c.post("/metrics", json=payload(), headers={"X-API-Key": wrong})).status_code
            == 401
        )
        assert (
            record(c.post("/metrics", json=payload(), headers={"X-API-Key": viewer})).status_code
            == 403
        )
        # Revoked: refused from the very next request.
        assert record(c.delete(f"/admin/keys/{new_id}", headers=ADMIN)).status_code == 200
        assert (
            record(c.post("/metrics", json=payload(), headers={"X-API-Key": new_key})).status_code
            == 401
        )
        record(c.get("/openapi.json"))
        scrape_port = re.search(r"Prometheus endpoint on http://127.0.0.1:(\d+)", service.log())
        assert scrape_port is not None
        record(httpx.get(f"http://127.0.0.1:{scrape_port.group(1)}/metrics"))
        files_running = _database_files(service, request)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    files_stopped = _database_files(service, request)
    log = service.log()
    assert "key" in log and "revoked" in log  # the log is there and talks about keys

    for key in (INGEST_KEY, ADMIN_KEY, new_key, viewer, wrong):
        for part in _secret_parts(key):
            assert part not in log, f"a key in the log: {part[:8]}…"
            assert not any(part in text for text in seen), f"a key in a response: {part[:8]}…"
            assert part.encode() not in files_running and part.encode() not in files_stopped
    # The database holds the hashes (so the files grepped are the right ones), never the keys.
    for key in (INGEST_KEY, ADMIN_KEY, new_key, viewer):
        assert hash_key(key).encode() in files_running + files_stopped
    assert stored_rows(service, "SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL") == [
        (1,)
    ]


# -- headers, CORS, admin switch, bind address ------------------------------------------------


def test_security_headers_and_no_cors(client: TestClient) -> None:
    evil = {"Origin": "https://evil.example"}
    responses = [
        client.get("/health", headers=evil),
        client.get("/admin/keys", headers={**evil, **ADMIN}),
        client.post("/metrics", json=payload(), headers={**evil, **H}),
        client.post(
            "/metrics", content=b"{", headers={**evil, **H, "Content-Type": "application/json"}
        ),
        client.get("/nope", headers=evil),
        client.get("/docs", headers=evil),
    ]
    preflight = client.options(
        "/metrics",
        headers={
            **evil,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    for r in [*responses, preflight]:
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers
        assert "server" not in r.headers or "uvicorn" not in r.headers["server"].lower()
    # A preflight is not answered: browsers on other origins cannot call the API.
    assert preflight.status_code in (404, 405)


def test_admin_endpoints_can_be_switched_off_entirely(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    on = create_app(make_settings())
    admin_paths = [p for p in on.openapi()["paths"] if p.startswith("/admin")]
    assert len(admin_paths) >= 5
    off = make_settings(admin_enabled=False)
    with TestClient(create_app(off)) as c:
        assert not [p for p in c.get("/openapi.json").json()["paths"] if p.startswith("/admin")]
        for path in admin_paths:
            for method in ("GET", "POST", "PUT", "DELETE"):
                r = c.request(
                    method, re.sub(r"\{[^}]+\}", "custom_metrics", path), headers=ADMIN, json={}
                )
                assert r.status_code in (404, 405), (method, path, r.status_code)
        assert c.get("/health").status_code == 200


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.append(address)
    return found


def test_binds_to_loopback_by_default(service: ServiceProcess) -> None:
    assert Settings().host == "127.0.0.1" and Settings().otel_prometheus_host == "127.0.0.1"
    service.unset_env = ["METRICS_SERVICE_HOST"]
    service.env["METRICS_SERVICE_PORT"] = str(service.port)
    service.start()
    match = re.search(r"Prometheus endpoint on http://127.0.0.1:(\d+)", service.log())
    assert match is not None
    for port in (service.port, int(match.group(1))):
        assert _listening(port) == ["0100007F"], (port, _listening(port))  # 127.0.0.1 only
    # The real server's responses carry the same headers, and no Server header.
    r = httpx.get(service.url + "/health", headers={"Origin": "https://evil.example"})
    assert r.headers["x-frame-options"] == "DENY" and "server" not in r.headers
    assert not any(h.lower().startswith("access-control-") for h in r.headers)
