"""Acknowledged means stored: SIGTERM and kill -9 of a real service process under load.

Every metric carries a unique id in its metadata (``tagged``), over all five families, so that
the check is "every id that got a 2xx is in the ``metrics`` view exactly once"."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._helpers import INGEST_KEY, ServiceProcess, custom, db_rows, payload
from tests._traffic import auth, discovery, protocol, tool

H = {"X-API-Key": INGEST_KEY}
_FAMILIES = (lambda: custom(1), auth, tool, discovery, protocol)


def tagged(ident: int) -> dict[str, Any]:
    """A metric of one of the five families (by ``ident``), carrying ``ident`` in its metadata."""
    metric = _FAMILIES[ident % len(_FAMILIES)]()
    return {**metric, "metadata": {**metric.get("metadata", {}), "id": ident}}


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


def stored_ids(db: Path) -> Counter[int]:
    return Counter(
        int(v) for (v,) in db_rows(db, "SELECT json_extract(metadata, '$.id') FROM metrics")
    )


def assert_all_acked_stored_once(db: Path, acked: list[int]) -> None:
    stored = stored_ids(db)
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
            r = c.post(
                "/metrics",
                json=payload(metrics=[tagged(i * 100 + j) for j in range(100)]),
                headers=H,
            )
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
    # Requests caught by the shutdown were refused cleanly (503 or a closed connection), never
    # answered with another 5xx; the pending ones were committed.
    assert not {s for s in load.statuses if isinstance(s, int) and s >= 500 and s != 503}, (
        load.statuses
    )
    assert " 0 left uncommitted" in service.log()


KILLS = 7  # per run; three runs (in parallel under xdist): 21 kills


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
        # The restarted service recovered the WAL: what was acknowledged before is all there.
        assert_all_acked_stored_once(service.db_path, acked)
        with Load(service.url, start=next_id, concurrency=6, batch=10) as load:
            load.stop.wait(rng.uniform(0, 0.4))
            service.kill9()
        acked += load.acked
        next_id = load.next_value + 1_000_000
    service.start()
    assert len(acked) > KILLS * 10
    assert_all_acked_stored_once(service.db_path, acked)
    record_property("kills", KILLS)
    record_property("acknowledged_checked", len(acked))
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
