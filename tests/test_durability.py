"""Acknowledged means stored: SIGTERM and kill -9 of a real service process under load."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import httpx

from tests._helpers import INGEST_KEY, ServiceProcess, custom, db_rows, payload

H = {"X-API-Key": INGEST_KEY}


class Load:
    """Concurrent clients posting batches of custom metrics with unique values until stopped.

    Records the values of every batch that got a 2xx.
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
                r = await client.post("/metrics", json=payload(metrics=[custom(v) for v in values]), headers=H)
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


def stored_values(db: Path) -> Counter[int]:
    return Counter(int(v) for (v,) in db_rows(db, "SELECT value FROM custom_metrics"))


def assert_all_acked_stored_once(db: Path, acked: list[int]) -> None:
    stored = stored_values(db)
    missing = [v for v in acked if stored[v] == 0]
    duplicated = [v for v, n in stored.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged metrics missing, e.g. {missing[:5]}"
    assert not duplicated, f"duplicated: {duplicated[:5]}"
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]


def test_sigterm_commits_pending_buffered_metrics_and_exits_0(service: ServiceProcess) -> None:
    service.env.update({"METRICS_ACK_MODE": "buffered", "METRICS_FLUSH_INTERVAL_S": "3600"})
    service.start()
    with httpx.Client(base_url=service.url, timeout=10) as c:
        for i in range(10):
            r = c.post("/metrics", json=payload(metrics=[custom(i * 100 + j) for j in range(100)]), headers=H)
            assert r.status_code == 200
    # Nothing is committed yet: the flush interval is an hour.
    assert db_rows(service.db_path, "SELECT count(*) FROM custom_metrics") == [(0,)]
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert_all_acked_stored_once(service.db_path, list(range(1000)))
    assert "1000 metrics committed, 0 left uncommitted" in service.log()


def test_sigterm_under_load_loses_nothing(service: ServiceProcess) -> None:
    service.start()
    with Load(service.url) as load:
        # Wait until a fair amount is flowing, then stop the service under load.
        while len(load.acked) < 2000:
            load.stop.wait(0.01)
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
    assert load.acked
    assert_all_acked_stored_once(service.db_path, load.acked)


def test_kill9_under_load_loses_no_acknowledged_metric(service: ServiceProcess) -> None:
    rng = random.Random(1234)
    acked: list[int] = []
    next_value = 0
    for _cycle in range(3):
        service.start()
        with Load(service.url, start=next_value) as load:
            target = len(load.acked) + rng.randint(200, 3000)
            while len(load.acked) < target:
                load.stop.wait(0.005)
            service.kill9()
        acked += load.acked
        next_value = load.next_value + 1_000_000
    assert len(acked) > 600
    assert_all_acked_stored_once(service.db_path, acked)
