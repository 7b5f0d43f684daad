"""The write queue: acknowledged means stored. Group commits retried while another process holds
the lock, durable 503s that store nothing, buffered rows retried whatever the failure, and
SIGTERM and kill -9 of a real service process under load.

Every metric carries a unique id in its metadata (``tagged``), over all five families, so that
the check is "every id that got a 2xx is in the ``metrics`` view exactly once". The service's
durability runs on SQLite and PostgreSQL (``BACKENDS``, tests/conftest.py); a writer holding
SQLite's lock is SQLite's alone (PostgreSQL going away: tests/test_replicas_pg.py)."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app, storage
from metrics_service.settings import AckMode
from tests._acked import assert_all_acked_stored_once, tagged
from tests._helpers import INGEST_KEY, ServiceProcess, custom, db_rows, payload, wait_for
from tests._servers import stored_rows

#: Acknowledged means stored on either backend.
BACKENDS = ("sqlite", "postgresql")

H = {"X-API-Key": INGEST_KEY}


class Load:
    """Concurrent clients posting batches of tagged metrics with unique ids until stopped.

    Records the ids of every batch that got a 2xx.
    """

    def __init__(self, url: str, *, concurrency: int = 8, batch: int = 20, start: int = 0) -> None:
        self.url = url
        self.concurrency = concurrency
        self.batch = batch
        self.next_value = start
        self.acked: list[int] = []
        self.statuses: Counter[int | str] = Counter()
        self.stop = threading.Event()
        self.started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            values = list(range(self.next_value, self.next_value + self.batch))
            self.next_value += self.batch
            try:
                r = await client.post(
                    "/metrics", json=payload(metrics=[tagged(v) for v in values]), headers=H
                )
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            self.statuses[r.status_code] += 1
            if 200 <= r.status_code < 300:
                assert r.json()["accepted"] == self.batch
                self.acked.extend(values)
                self.started.set()

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))


def test_sigterm_commits_pending_buffered_metrics_and_exits_0(service: ServiceProcess) -> None:
    service.env.update({"METRICS_ACK_MODE": "buffered", "METRICS_FLUSH_INTERVAL_S": "3600"})
    service.start()
    with httpx.Client(base_url=service.url, timeout=10) as c:
        for i in range(10):
            r = c.post(
                "/metrics",
                json=payload(metrics=[tagged(i * 100 + j) for j in range(100)]),
                headers=H,
            )
            assert r.status_code == 200
    # Nothing is committed yet: the flush interval is an hour.
    assert stored_rows(service, "SELECT count(*) FROM custom_metrics") == [(0,)]
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert_all_acked_stored_once(service, list(range(1000)))
    assert "1000 metrics committed, 0 left uncommitted" in service.log()


def test_sigterm_under_load_loses_nothing(service: ServiceProcess) -> None:
    service.start()
    with Load(service.url) as load:
        # Wait until a fair amount is flowing, then stop the service under load.
        wait_for(lambda: len(load.acked) >= 2000, timeout_s=60)
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
    assert load.acked
    assert_all_acked_stored_once(service, load.acked)
    # Requests caught by the shutdown were refused cleanly (503 or a closed connection), never
    # answered with another 5xx; the pending ones were committed.
    assert not {s for s in load.statuses if isinstance(s, int) and s >= 500 and s != 503}, (
        load.statuses
    )
    assert " 0 left uncommitted" in service.log()


KILLS = 7  # per run; three runs per backend (in parallel under xdist): 21 kills on each


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_at_random_moments_under_load_loses_no_acknowledged_metric(
    service: ServiceProcess, seed: int, record_property: Callable[[str, object], None]
) -> None:
    """kill -9 at random moments of a run under load (from right after the first 200 to ~0.4 s
    into it); after every restart each acknowledged metric is stored exactly once."""
    rng = random.Random(seed)
    acked: list[int] = []
    next_id = 0
    for _cycle in range(KILLS):
        service.start()
        # The restarted service finds all that was acknowledged before (SQLite: its WAL recovered).
        assert_all_acked_stored_once(service, acked)
        with Load(service.url, start=next_id, concurrency=6, batch=10) as load:
            load.stop.wait(rng.uniform(0, 0.4))
            service.kill9()
        acked += load.acked
        next_id = load.next_value + 1_000_000
    service.start()
    assert len(acked) > KILLS * 10
    assert_all_acked_stored_once(service, acked)
    record_property("kills", KILLS)
    record_property("acknowledged_checked", len(acked))
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def _hold_write_lock(db: Path) -> sqlite3.Connection:
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


@pytest.mark.sqlite_only("SQLite's one writer lock, held by another connection")
def test_a_commit_blocked_by_another_writer_is_retried_without_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    settings = Settings(db_path=tmp_path / "m.db", sqlite_busy_timeout_ms=20, commit_retries=100)
    with TestClient(create_app(settings)) as c:
        other = _hold_write_lock(settings.db_path)
        result: dict[str, int] = {}
        poster = threading.Thread(
            target=lambda: result.update(
                status=c.post(
                    "/metrics", json=payload(metrics=[custom(i) for i in range(50)]), headers=H
                ).status_code
            )
        )
        poster.start()
        # Release only once the writer has failed at least once against the lock.
        state = c.app.state.metrics  # type: ignore[attr-defined]
        wait_for(lambda: state.queue.last_error is not None, timeout_s=10)
        other.execute("ROLLBACK")
        other.close()
        poster.join(30)
        assert result == {"status": 200}
        assert state.queue.healthy
    assert db_rows(
        settings.db_path, "SELECT count(*), count(DISTINCT value) FROM custom_metrics"
    ) == [(50, 50)]


@pytest.mark.sqlite_only("SQLite's one writer lock, held by another connection")
def test_durable_commit_that_keeps_failing_is_503_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    settings = Settings(db_path=tmp_path / "m.db", sqlite_busy_timeout_ms=10, commit_retries=1)
    with TestClient(create_app(settings)) as c:
        other = _hold_write_lock(settings.db_path)
        r = c.post("/metrics", json=payload(metrics=[custom(1)]), headers=H)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert c.get("/ready").status_code == 503
        other.execute("ROLLBACK")
        other.close()
        # It recovers by itself once the database is free again.
        r = c.post("/metrics", json=payload(metrics=[custom(2)]), headers=H)
        assert r.status_code == 200
        assert c.get("/ready").status_code == 200
    assert db_rows(settings.db_path, "SELECT value FROM custom_metrics") == [(2.0,)]


def test_buffered_rows_are_retried_whatever_the_failure_until_stored(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In buffered mode a 200 comes before the commit, so a commit that fails with anything
    (here a RuntimeError, as a bug or an exhausted resource would raise) is retried, never
    dropped. Fault injection at the storage seam: the first three commits raise, then the
    backend's real one runs."""
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    settings = make_settings(ack_mode=AckMode.buffered, flush_interval_s=0.05)
    backend_class = type(storage.create_backend(settings))
    real_insert = backend_class.insert_batches
    failures = {"left": 3}

    async def flaky_insert(self: Any, parts: Any, claims: Any = ()) -> int:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure")
        return await real_insert(self, parts, claims)

    monkeypatch.setattr(backend_class, "insert_batches", flaky_insert)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.metrics  # type: ignore[attr-defined]
        r = c.post("/metrics", json=payload(metrics=[custom(i) for i in range(20)]), headers=H)
        assert r.status_code == 200 and r.json()["accepted"] == 20
        wait_for(lambda: state.queue.committed_metrics == 20, timeout_s=30)
        assert failures["left"] == 0 and state.queue.healthy
        assert state.telemetry.totals["metrics_service_commit_failures"].values[()] == 3
    assert stored_rows(settings, "SELECT count(*), count(DISTINCT value) FROM custom_metrics") == [
        (20, 20)
    ]
