"""Every status code of the API, through the real app on a temporary database: a SQLite file, and
a PostgreSQL database of a real server (``BACKENDS``, tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    ServiceProcess,
    auth_event,
    custom,
    payload,
    tool_event,
)
from tests._servers import stored_rows

#: The API answers the same on either backend.
BACKENDS = ("sqlite", "postgresql")

H = {"X-API-Key": INGEST_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}


def error_of(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) >= {"error", "request_id"}, body
    assert body["request_id"] == response.headers["x-request-id"]  # type: ignore[attr-defined]
    return body["error"]  # type: ignore[no-any-return]


def test_accepts_every_family_and_stores_in_typed_tables_and_metrics_view(
    client: TestClient, settings: Settings
) -> None:
    metrics = [
        auth_event(),
        tool_event(),
        {
            "type": "tool_discovery",
            "duration_ms": 80,
            "dimensions": {
                "query": "weather tools",
                "results_count": 5,
                "top_k": 10,
                "top_n": 5,
                "embedding_time_ms": 12.5,
                "search_time_ms": 3.25,
            },
        },
        {
            "type": "protocol_latency",
            "duration_ms": 250,
            "dimensions": {"flow_step": "initialize->tools/list"},
        },
        custom(7.5, region="eu"),
    ]
    r = client.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 5 and r.json()["rejected"] == 0
    db = settings
    assert stored_rows(
        db, "SELECT success, method, server, user_hash, duration_ms FROM auth_metrics"
    ) == [(1, "jwt", "auth-1", "u1", 12.5)]
    assert stored_rows(
        db,
        "SELECT tool_name, client_name, success, input_size_bytes, output_size_bytes, tenant_id, "
        "input_tokens FROM tool_metrics",
    ) == [("search", "claude", 1, 120, 2048, "acme", 10)]
    assert stored_rows(
        db,
        "SELECT query, results_count, top_k, top_n, embedding_time_ms, search_time_ms FROM "
        "discovery_metrics",
    ) == [("weather tools", 5, 10, 5, 12.5, 3.25)]
    assert stored_rows(db, "SELECT flow_step, duration_ms FROM protocol_latency_metrics") == [
        ("initialize->tools/list", 250.0)
    ]
    by_type = dict(stored_rows(db, "SELECT type, count(*) FROM metrics GROUP BY type"))
    assert by_type == {
        "auth_request": 1,
        "tool_execution": 1,
        "tool_discovery": 1,
        "protocol_latency": 1,
        "custom": 1,
    }
    (dims,) = stored_rows(db, "SELECT dimensions FROM metrics WHERE type = 'custom'")[0]
    assert json.loads(dims) == {"region": "eu"}
    (dims,) = stored_rows(db, "SELECT dimensions FROM metrics WHERE type = 'auth_request'")[0]
    assert json.loads(dims) == {
        "success": True,
        "method": "jwt",
        "server": "auth-1",
        "user_hash": "u1",
    }


def test_event_time_and_receive_time_are_both_kept(client: TestClient, settings: Settings) -> None:
    import time

    event_s = int(time.time()) - 3600
    r = client.post(
        "/metrics", json=payload(metrics=[{**custom(1), "timestamp": event_s}]), headers=H
    )
    assert r.status_code == 200
    ((ts, received),) = stored_rows(settings, "SELECT ts, received_at FROM custom_metrics")
    assert ts == event_s * 1000
    assert abs(received - time.time() * 1000) < 60_000


def test_partial_success_names_index_field_and_rule(client: TestClient, settings: Settings) -> None:
    metrics = [
        custom(1),
        {"type": "auth_request", "dimensions": {"success": "yes"}},
        {"type": "nope"},
        {"type": "custom", "value": "x"},
        {"type": "tool_execution", "dimensions": {"success": True}},
        {"type": "custom", "duration_ms": -1},
        {"type": "custom", "timestamp": "2999-01-01T00:00:00Z"},
        {"type": "auth_request", "value": -1, "dimensions": {"success": True}},
        custom(2),
    ]
    r = client.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == 2 and body["rejected"] == 7
    got = {(e["index"], e["field"], e["rule"]) for e in body["errors"]}
    assert got == {
        (1, "metrics[1].dimensions.success", "type"),
        (2, "metrics[2].type", "enum"),
        (3, "metrics[3].value", "type"),
        (4, "metrics[4].dimensions.method", "required"),
        (5, "metrics[5].duration_ms", "ge"),
        (6, "metrics[6].timestamp", "max_future_skew"),
        (7, "metrics[7].value", "ge"),
    }
    assert stored_rows(settings, "SELECT value FROM custom_metrics ORDER BY value") == [
        (1.0,),
        (2.0,),
    ]


def test_a_nul_character_in_a_string_is_refused_with_its_field_never_a_503(
    client: TestClient, settings: Settings
) -> None:
    """U+0000 is legal JSON in any string, and PostgreSQL's text cannot hold it: the metric
    carrying it is refused with its field and rule ``charset`` on every backend, the others are
    stored; a filter and a key description holding it are a 422, never a 503."""
    tool = tool_event()
    tool["dimensions"]["tool_name"] = "se\u0000arch"
    meta = custom(3)
    meta["metadata"] = {"trace": {"note\u0000": 1}}
    metrics = [custom(1, name="a\u0000b"), tool, custom(2), meta]
    r = client.post("/metrics", json=payload(metrics=metrics), headers=H)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1 and body["rejected"] == 3
    assert [(e["index"], e["field"], e["rule"]) for e in body["errors"]] == [
        (0, "metrics[0].dimensions.name", "charset"),
        (1, "metrics[1].dimensions.tool_name", "charset"),
        (3, "metrics[3].metadata.trace.note\\u0000", "charset"),
    ]
    assert len(stored_rows(settings, "SELECT type, dimensions FROM metrics")) == 1
    # A backslash followed by "u0000" is text like any other, stored as sent.
    literal = custom(4, name="back\\u0000slash")
    r = client.post("/metrics", json=payload(metrics=[literal]), headers=H)
    assert r.json()["accepted"] == 1, r.text
    r = client.post("/metrics", json=payload(metrics=[custom(5)], version="1\u00002"), headers=H)
    assert r.status_code == 422 and error_of(r)["details"][0]["rule"] == "charset"
    r = client.get("/analytics/summary", params={"server": "x\u0000y"}, headers=ADMIN)
    assert r.status_code == 422 and error_of(r)["details"][0]["rule"] == "charset", r.text
    r = client.post(
        "/admin/keys", json={"service": "svc", "description": "x\u0000y"}, headers=ADMIN
    )
    assert r.status_code == 422, r.text
    # Nothing blocked the queue: the next metric is stored at once.
    assert client.post("/metrics", json=payload(), headers=H).status_code == 200


def test_integers_of_64_bits_are_stored_as_sent(client: TestClient, settings: Settings) -> None:
    """Validation takes counts and sizes up to 64 bits (tests/test_hostile_input.py refuses
    more); each backend stores them unchanged (PostgreSQL's columns are bigint since its
    migration 4)."""
    tool = tool_event()
    tool["dimensions"]["output_size_bytes"] = 2**40
    tool["metadata"]["input_tokens"] = 2**33
    discovery = {"type": "tool_discovery", "dimensions": {"results_count": 2**62}}
    r = client.post("/metrics", json=payload(metrics=[tool, discovery]), headers=H)
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    assert stored_rows(settings, "SELECT output_size_bytes, input_tokens FROM tool_metrics") == [
        (2**40, 2**33)
    ]
    assert stored_rows(settings, "SELECT results_count FROM discovery_metrics") == [(2**62,)]


def test_all_rejected_is_422_and_stores_nothing(client: TestClient, settings: Settings) -> None:
    r = client.post("/metrics", json=payload(metrics=[{"type": "nope"}]), headers=H)
    assert r.status_code == 422
    assert r.json()["accepted"] == 0
    assert error_of(r)["code"] == "validation_failed"
    assert stored_rows(settings, "SELECT count(*) FROM metrics") == [(0,)]


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"version": "1", "metrics": [custom(1)]}, "service", "required"),
        ({"service": "svc", "version": "1", "metrics": []}, "metrics", "min_length"),
        ({"service": "svc", "version": "1", "metrics": "x"}, "metrics", "type"),
        ({"service": "Bad Name!", "version": "1", "metrics": [custom(1)]}, "service", "pattern"),
        ([1, 2], "$", "type"),
    ],
)
def test_wrong_shape_is_422_with_field_path(
    client: TestClient, body: object, field: str, rule: str
) -> None:
    r = client.post("/metrics", json=body, headers=H)
    assert r.status_code == 422
    details = error_of(r)["details"]
    assert [(d["field"], d["rule"]) for d in details] == [(field, rule)]  # type: ignore[index,union-attr]


def test_too_many_items_is_422(client: TestClient) -> None:
    r = client.post("/metrics", json=payload(metrics=[custom(1)] * 1001), headers=H)
    assert r.status_code == 422
    assert error_of(r)["details"][0]["rule"] == "max_length"  # type: ignore[index]


@pytest.mark.parametrize("raw", [b"{not json", b'{"service": "svc"', b"\xff\xfe\x00", b""])
def test_invalid_json_is_400(client: TestClient, raw: bytes) -> None:
    r = client.post("/metrics", content=raw, headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_json"


def test_missing_unknown_and_revoked_keys_are_401(client: TestClient) -> None:
    assert client.post("/metrics", json=payload()).status_code == 401
    r = client.post(
        "/metrics", json=payload(), headers={"X-API-Key": "wrong-key-wrong-key-wrong-key"}
    )
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    created = client.post("/admin/keys", json={"service": "svc"}, headers=ADMIN)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    assert client.post("/metrics", json=payload(), headers={"X-API-Key": key}).status_code == 200
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).status_code == 200
    # Revocation takes effect on the very next request.
    assert client.post("/metrics", json=payload(), headers={"X-API-Key": key}).status_code == 401


def test_key_for_another_service_is_403_and_stores_nothing(
    client: TestClient, settings: Settings
) -> None:
    r = client.post("/metrics", json=payload(service="other"), headers=H)
    assert r.status_code == 403 and error_of(r)["code"] == "forbidden"
    assert stored_rows(settings, "SELECT count(*) FROM metrics") == [(0,)]


def test_body_over_limit_is_413_by_header_and_by_stream(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    settings = make_settings(max_request_bytes=2048)
    big = json.dumps(payload(metrics=[custom(1, pad="x" * 200)] * 20)).encode()
    assert len(big) > 2048
    with TestClient(create_app(settings)) as c:
        r = c.post("/metrics", content=big, headers={**H, "Content-Type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        r = c.post("/metrics", content=chunks(), headers={**H, "Content-Type": "application/json"})
        assert r.status_code == 413
        assert stored_rows(settings, "SELECT count(*) FROM metrics") == [(0,)]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/json", "Content-Encoding": "br"},
    ],
)
def test_wrong_content_type_is_415(client: TestClient, headers: dict[str, str]) -> None:
    r = client.post("/metrics", content=json.dumps(payload()).encode(), headers={**H, **headers})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"


def test_rate_limit_is_429_with_headers(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    settings = make_settings(rate_limit_per_min=3)
    with TestClient(create_app(settings)) as c:
        ok = [c.post("/metrics", json=payload(), headers=H) for _ in range(3)]
        assert [r.status_code for r in ok] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["2", "1", "0"]
        r = c.post("/metrics", json=payload(), headers=H)
        assert r.status_code == 429 and error_of(r)["code"] == "rate_limited"
        assert r.headers["x-ratelimit-limit"] == "3"
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 61  # the 1-second bucket plus the window
        status = c.get("/rate-limit", headers=H)
        assert status.status_code == 200 and status.json()["remaining"] == 0
        assert stored_rows(settings, "SELECT count(*) FROM metrics") == [(3,)]


def test_per_key_rate_limit_override(client: TestClient) -> None:
    created = client.post(
        "/admin/keys", json={"service": "svc", "rate_limit_per_min": 1}, headers=ADMIN
    ).json()
    h = {"X-API-Key": created["key"]}
    assert client.post("/metrics", json=payload(), headers=h).status_code == 200
    assert client.post("/metrics", json=payload(), headers=h).status_code == 429
    # The other key of the same service has its own budget.
    assert client.post("/metrics", json=payload(), headers=H).status_code == 200


def test_queue_full_is_503_with_retry_after(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    settings = make_settings(
        ack_mode="buffered",
        flush_interval_s=3600,
        queue_max_metrics=5,
        commit_max_rows=1000,
    )
    with TestClient(create_app(settings)) as c:
        assert (
            c.post(
                "/metrics", json=payload(metrics=[custom(i) for i in range(5)]), headers=H
            ).status_code
            == 200
        )
        r = c.post("/metrics", json=payload(), headers=H)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert error_of(r)["code"] == "unavailable"
    # The five acknowledged metrics were committed at shutdown.
    assert stored_rows(settings, "SELECT count(*) FROM custom_metrics") == [(5,)]


def test_shutting_down_is_503(client: TestClient) -> None:
    state = client.app.state.metrics  # type: ignore[attr-defined]
    client.portal.call(state.queue.close, 5.0)  # type: ignore[union-attr]
    r = client.post("/metrics", json=payload(), headers=H)
    assert r.status_code == 503 and "shutting down" in error_of(r)["message"]  # type: ignore[operator]


def test_every_response_has_a_request_id(client: TestClient) -> None:
    for r in [
        client.get("/health"),
        client.get("/nope"),
        client.post("/metrics", json=payload()),
        client.post("/metrics", json=payload(), headers=H),
    ]:
        assert len(r.headers["x-request-id"]) >= 16
    r = client.get("/health", headers={"X-Request-Id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    r = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"
    ids = [
        client.post("/metrics", json=payload(), headers=H).headers["x-request-id"]
        for _ in range(50)
    ]
    assert len(set(ids)) == 50 and all(len(i) == 32 for i in ids)
    # The ingest endpoint sets its own headers: the caller's id echoed, each header once.
    r = client.post("/metrics", json=payload(), headers={**H, "X-Request-Id": "trace-9"})
    assert r.headers.get_list("x-request-id") == ["trace-9"]
    assert r.headers.get_list("x-content-type-options") == ["nosniff"]
    assert r.json()["request_id"] == "trace-9"


def test_health_ready_docs(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "service": "metrics-collection"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/metrics" in schema["paths"] and "MetricsPayload" in schema["components"]["schemas"]


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = client.put("/metrics", headers=H)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_a_body_trickled_too_slowly_is_408_and_others_are_served(service: ServiceProcess) -> None:
    import socket

    import httpx

    service.env["METRICS_REQUEST_TIMEOUT_S"] = "1"
    service.start()
    body = json.dumps(payload()).encode()
    with socket.create_connection(("127.0.0.1", service.port)) as slow:
        head = (
            f"POST /metrics HTTP/1.1\r\nHost: x\r\nX-API-Key: {INGEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        slow.sendall(head.encode() + body[:5])
        # Meanwhile another client is served at once.
        assert (
            httpx.post(service.url + "/metrics", json=payload(), headers=H, timeout=5).status_code
            == 200
        )
        slow.settimeout(10)
        response = b""
        while b'"request_timeout"' not in response:
            chunk = slow.recv(4096)
            if not chunk:
                break
            response += chunk
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b'"request_timeout"' in response
