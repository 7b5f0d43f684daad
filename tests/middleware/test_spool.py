"""The on-disk spool: events outlive their client, the spool stays within its bound.

(The client process killed with kill -9 while posting is in test_exactly_once.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mcp_metrics import ClientConfig, ThreadedMetricsClient

from .conftest import API_KEY, IngestServer, wait_until


def spooled(url: str, path: Path, **options: Any) -> ThreadedMetricsClient:
    options.setdefault("flush_interval_s", 0.05)
    options.setdefault("backoff_base_s", 0.05)
    options.setdefault("backoff_max_s", 0.2)
    return ThreadedMetricsClient(
        url=url,
        api_key=API_KEY,
        service="mw-test",
        spool_path=str(path),
        register_atexit=False,
        **options,
    )


def spool_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name != "lock")


def test_an_outage_and_a_restart_lose_nothing(down_ingest: IngestServer, tmp_path: Path) -> None:
    path = tmp_path / "spool"
    first = spooled(down_ingest.url, path, max_batch_size=100)
    for i in range(250):
        first.record_custom("spooled", value=i)
    wait_until(lambda: first.stats().retries >= 1, what="a failed attempt while down")
    first.close(timeout_s=0.2)
    stats = first.stats()
    assert (stats.sent, stats.dropped_shutdown) == (0, 0)
    assert stats.queued + stats.in_flight == 250  # still in the spool, not dropped
    [batch] = path.glob("batch-*.json")  # the batch in flight, with its key
    taken_key = json.loads(batch.read_bytes().split(b"\n", 1)[0])["parts"][0]["key"]

    down_ingest.start()
    second = spooled(down_ingest.url, path, max_batch_size=100)
    assert second.stats().recovered == 250
    wait_until(lambda: second.stats().sent == 250, what="the spooled events delivered")
    assert sorted(m["value"] for m in down_ingest.accepted) == list(range(250))
    # The batch taken by the first client went out with the key it was given then.
    keys = [r.headers["Idempotency-Key"] for r in down_ingest.requests]
    assert len(keys) == len(set(keys)) == 3
    assert keys[0] == taken_key
    second.close()
    assert not list(path.glob("batch-*.json"))
    third = spooled(down_ingest.url, path)
    assert third.stats().recovered == 0
    third.close()


def test_the_spool_is_bounded_and_drops_the_oldest(
    down_ingest: IngestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool"
    limit = 2 * 1024 * 1024
    client = spooled(down_ingest.url, path, spool_max_bytes=limit, max_batch_size=500)
    total = 30_000
    with caplog.at_level(logging.WARNING, logger="mcp_metrics"):
        for i in range(total):
            client.record_custom("burst", value=i, pad="p" * 40)
            if i % 1000 == 0:
                assert spool_bytes(path) <= limit
    stats = client.stats()
    assert stats.dropped_overflow > 0
    assert spool_bytes(path) <= limit
    assert len([r for r in caplog.records if "spool full" in r.getMessage()]) == 1
    down_ingest.start()
    wait_until(
        lambda: client.stats().queued == 0 and client.stats().in_flight == 0,
        timeout=60,
        what="the spool drained",
    )
    stats = client.stats()
    values = sorted(m["value"] for m in down_ingest.accepted)
    assert len(values) == stats.sent == total - stats.dropped_overflow
    assert len(set(values)) == len(values)
    assert values[-1000:] == list(range(total - 1000, total))  # the newest survived
    client.close()


def test_a_spool_in_use_is_not_shared(
    ingest: IngestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool"
    owner = spooled(ingest.url, path)
    with caplog.at_level(logging.ERROR, logger="mcp_metrics"):
        other = spooled(ingest.url, path)
    assert any("in use by another process" in r.getMessage() for r in caplog.records)
    other.record_custom("in memory")
    owner.record_custom("on disk")
    assert other.flush(5) and owner.flush(5)
    assert sorted(m["dimensions"]["name"] for m in ingest.accepted) == ["in memory", "on disk"]
    other.close()
    owner.close()


def test_spool_settings_from_the_environment(tmp_path: Path) -> None:
    env = {
        "METRICS_CLIENT_SPOOL_PATH": str(tmp_path / "s"),
        "METRICS_CLIENT_SPOOL_MAX_BYTES": "4194304",
    }
    cfg = ClientConfig.from_env(env)
    assert (cfg.spool_path, cfg.spool_max_bytes) == (str(tmp_path / "s"), 4 * 1024 * 1024)
    with pytest.raises(ValueError, match="spool_max_bytes"):
        ClientConfig.from_env({**env, "METRICS_CLIENT_SPOOL_MAX_BYTES": "1000"})
    with pytest.raises(ValueError, match="METRICS_CLIENT_SPOOL_MAX_BYTES"):
        ClientConfig.from_env({**env, "METRICS_CLIENT_SPOOL_MAX_BYTES": "lots"})
