"""``Idempotency-Key`` on ``POST /metrics``: a batch retried with its key is stored once.

The real app on a temporary database, SQLite and PostgreSQL (``BACKENDS``, tests/conftest.py), in
process and as a real process for restarts and concurrency; rows are counted in the database,
never taken from the response alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app, idempotency, storage
from metrics_service.errors import StorageError
from tests._helpers import INGEST_KEY, OTHER_KEY, ServiceProcess, custom, payload, wait_for
from tests._servers import execute_sql, stored_rows

#: Keys are claimed in the transaction of the rows on either backend.
BACKENDS = ("sqlite", "postgresql")

H = {"X-API-Key": INGEST_KEY}


def keyed(key: str) -> dict[str, str]:
    return {**H, "Idempotency-Key": key}


def stored(db: Any) -> int:
    """Rows stored in the database of ``db`` (``Settings`` or a ``ServiceProcess``)."""
    return int(stored_rows(db, "SELECT count(*) FROM custom_metrics")[0][0])


def keys(db: Any) -> list[tuple[Any, ...]]:
    return stored_rows(db, "SELECT service, key, status FROM idempotency_keys ORDER BY key")


def age_old_key(db: Any) -> None:
    """Move the committed time of key ``old`` back past a window of an hour."""
    execute_sql(
        db, "UPDATE idempotency_keys SET committed_at = committed_at - 3601000 WHERE key = 'old'"
    )


@pytest.fixture
def app(settings: Settings, keyed_env: None) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def test_a_replay_gets_the_first_answer_and_stores_nothing(
    app: TestClient, settings: Settings
) -> None:
    body = payload(metrics=[custom(1), {"type": "bogus"}, custom(2)])
    first = app.post("/metrics", json=body, headers=keyed("batch-1"))
    assert first.status_code == 200
    assert idempotency.REPLAY_HEADER not in first.headers
    # Partial success is kept: index, field and rule of the rejected item.
    assert first.json()["accepted"] == 2
    assert first.json()["errors"][0]["index"] == 1
    assert first.json()["errors"][0]["field"] == "metrics[1].type"
    assert first.json()["errors"][0]["rule"] == "enum"
    for _ in range(3):
        again = app.post("/metrics", json=body, headers=keyed("batch-1"))
        assert again.status_code == 200
        assert again.headers[idempotency.REPLAY_HEADER] == "true"
        assert again.json() == first.json()  # the same request_id too: it is the first answer
    assert stored(settings) == 2
    assert keys(settings) == [("svc", "batch-1", 200)]
    # Without a key, the same body is a new batch.
    assert app.post("/metrics", json=body, headers=H).status_code == 200
    assert stored(settings) == 4


def test_quoted_and_bare_keys_are_the_same_key(app: TestClient, settings: Settings) -> None:
    body = payload(metrics=[custom(7)])
    assert app.post("/metrics", json=body, headers=keyed('"k-42"')).status_code == 200
    again = app.post("/metrics", json=body, headers=keyed("k-42"))
    assert again.headers[idempotency.REPLAY_HEADER] == "true"
    assert stored(settings) == 1


def test_keys_are_scoped_per_service(settings: Settings, keyed_env: None) -> None:
    with TestClient(create_app(settings)) as c:
        a = c.post("/metrics", json=payload("svc"), headers=keyed("shared"))
        b = c.post(
            "/metrics",
            json=payload("other"),
            headers={"X-API-Key": OTHER_KEY, "Idempotency-Key": "shared"},
        )
    assert (a.status_code, b.status_code) == (200, 200)
    assert idempotency.REPLAY_HEADER not in b.headers
    assert len(keys(settings)) == 2


def test_the_same_key_with_another_body_is_refused(app: TestClient, settings: Settings) -> None:
    assert app.post("/metrics", json=payload(), headers=keyed("k1")).status_code == 200
    other = app.post("/metrics", json=payload(metrics=[custom(99)]), headers=keyed("k1"))
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["details"] == [
        {"field": "Idempotency-Key", "rule": "same_body", "message": error["message"]}
    ]
    assert stored(settings) == 1


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (b"", "length"),
        (b'""', "length"),
        (b"x" * 256, "length"),
        (b"has space", "charset"),
        (b'with"quote', "charset"),
        (b"back\\slash", "charset"),
        ("caf\u00e9".encode(), "charset"),
    ],
)
def test_a_malformed_key_is_a_clear_400_and_stores_nothing(
    app: TestClient, settings: Settings, value: bytes, rule: str
) -> None:
    response = app.post(
        "/metrics",
        content=httpx.Request("POST", "http://x", json=payload()).content,
        headers=[
            (b"X-API-Key", INGEST_KEY.encode()),
            (b"Content-Type", b"application/json"),
            (b"Idempotency-Key", value),
        ],
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_idempotency_key"
    assert error["details"][0]["field"] == "Idempotency-Key"
    assert error["details"][0]["rule"] == rule
    assert stored(settings) == 0


def test_the_longest_key_is_accepted(app: TestClient, settings: Settings) -> None:
    key = "k" * idempotency.MAX_KEY_LENGTH
    assert app.post("/metrics", json=payload(), headers=keyed(key)).status_code == 200
    assert app.post("/metrics", json=payload(), headers=keyed(key)).headers[
        idempotency.REPLAY_HEADER
    ]
    assert stored(settings) == 1


def test_a_batch_with_nothing_valid_is_not_remembered(app: TestClient, settings: Settings) -> None:
    bad = payload(metrics=[{"type": "bogus"}])
    for _ in range(2):
        response = app.post("/metrics", json=bad, headers=keyed("nothing"))
        assert response.status_code == 422
        assert idempotency.REPLAY_HEADER not in response.headers
    assert keys(settings) == []


def test_a_key_past_the_window_is_a_new_batch_and_upkeep_forgets_it(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    settings = make_settings(idempotency_window_s=3600, admin_api_key="a" * 32)
    with TestClient(create_app(settings)) as c:
        assert c.post("/metrics", json=payload(), headers=keyed("old")).status_code == 200
        assert c.post("/metrics", json=payload(), headers=keyed("young")).status_code == 200
        # Age one key past the window (the clock is not waited on).
        age_old_key(settings)
        again = c.post("/metrics", json=payload(), headers=keyed("young"))
        assert again.headers[idempotency.REPLAY_HEADER] == "true"
        assert stored(settings) == 2
        age_old_key(settings)
        # Expired: taken over as a new batch (stored, not replayed).
        fresh = c.post("/metrics", json=payload(), headers=keyed("old"))
        assert idempotency.REPLAY_HEADER not in fresh.headers
        assert stored(settings) == 3
        age_old_key(settings)
        cleanup = c.post(
            "/admin/retention/cleanup",
            params={"dry_run": "false"},
            headers={"X-API-Key": "a" * 32},
        )
        assert cleanup.status_code == 200
    assert [k for _, k, _ in keys(settings)] == ["young"]


def test_the_key_is_claimed_in_the_transaction_of_the_rows(settings: Settings) -> None:
    """Two backends (two processes' connections) committing the same key: the first stores, the
    second's part is left out and it learns the first answer; nothing half-done on failure."""
    row = (1000, 1000, "svc", "1", None, 1.0, None, None, None)
    parts = [{"custom": [row]}]

    def claim(status: int) -> idempotency.Claim:
        return idempotency.Claim("svc", "k", "print", status, b'{"n":1}', 3600)

    async def run() -> None:
        first, second = storage.create_backend(settings), storage.create_backend(settings)
        await first.open()
        await second.open()
        try:
            a, b = claim(200), claim(201)
            assert await first.insert_batches(parts, [a]) == 1
            assert await second.insert_batches(parts, [b]) == 0
            assert a.existing is None
            assert b.existing == idempotency.Stored("print", 200, b'{"n":1}')
            # A part without a key in the same commit is stored as usual.
            c = claim(200)
            assert await second.insert_batches([parts[0], parts[0]], [c, None]) == 1
            # A commit that fails after the claim leaves no key behind.
            broken = [{"custom": [(*row[:5], None, *row[6:])]}]  # value NOT NULL
            d = idempotency.Claim("svc", "fails", "p", 200, b"{}", 3600)
            with pytest.raises(StorageError, match="commit failed"):
                await first.insert_batches(broken, [d])
        finally:
            await first.close()
            await second.close()

    asyncio.run(run())
    assert stored(settings) == 2
    assert [k for _, k, _ in keys(settings)] == ["k"]


def _concurrent_posts(url: str, body: dict[str, Any], key: str, n: int) -> list[httpx.Response]:
    barrier = threading.Barrier(n)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            r = client.post(url + "/metrics", json=body, headers=keyed(key))
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return responses


@pytest.mark.parametrize("ack_mode", ["durable", "buffered"])
def test_replays_racing_the_first_attempt_wait_for_it(
    service: ServiceProcess, ack_mode: str
) -> None:
    # A slow commit (linger, or the buffered flush interval) keeps the first attempt in flight
    # while the others arrive.
    service.env.update(
        {
            "METRICS_ACK_MODE": ack_mode,
            "METRICS_COMMIT_LINGER_MS": "300",
            "METRICS_FLUSH_INTERVAL_S": "0.5",
        }
    )
    service.start()
    body = payload(metrics=[custom(i) for i in range(5)])
    responses = _concurrent_posts(service.url, body, "racing", 8)
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.json()["request_id"] for r in responses}) == 1
    assert sum(1 for r in responses if idempotency.REPLAY_HEADER in r.headers) == 7
    if ack_mode == "buffered":
        wait_for(lambda: stored(service) >= 5, 10)
    assert stored(service) == 5
    # Committed now: a later replay reads the database.
    with httpx.Client() as client:
        later = client.post(service.url + "/metrics", json=body, headers=keyed("racing"))
    assert later.headers[idempotency.REPLAY_HEADER] == "true"
    assert later.json() == responses[0].json()
    assert stored(service) == 5


@pytest.mark.parametrize("ack_mode", ["durable", "buffered"])
def test_committed_keys_hold_across_a_restart(service: ServiceProcess, ack_mode: str) -> None:
    service.env.update({"METRICS_ACK_MODE": ack_mode, "METRICS_FLUSH_INTERVAL_S": "0.2"})
    service.start()
    body = payload(metrics=[custom(1), custom(2)])
    first = httpx.post(service.url + "/metrics", json=body, headers=keyed("restart"))
    assert first.status_code == 200
    service.stop()  # SIGTERM: buffered rows are committed on the way out
    service.start()
    again = httpx.post(service.url + "/metrics", json=body, headers=keyed("restart"))
    assert again.status_code == 200
    assert again.headers[idempotency.REPLAY_HEADER] == "true"
    assert again.json() == first.json()
    assert stored(service) == 2


def test_a_replay_costs_no_write_when_acknowledgement_is_buffered(
    make_settings: Callable[..., Settings], keyed_env: None
) -> None:
    settings = make_settings(ack_mode="buffered", flush_interval_s=0.05)
    with TestClient(create_app(settings)) as c:
        first = c.post("/metrics", json=payload(), headers=keyed("b"))
        wait_for(lambda: stored(settings) >= 1, 10)
        again = c.post("/metrics", json=payload(), headers=keyed("b"))
        assert again.headers[idempotency.REPLAY_HEADER] == "true"
        assert again.json() == first.json()
    assert stored(settings) == 1
