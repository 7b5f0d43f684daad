"""The recording side and its delivery policy (mcp_metrics/recorder.py): backoff, the sender
loop's steps and keys, events that cannot be sent, the bounded queue, batch splitting."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import httpx
import pytest
from mcp_metrics import Recorder, ThreadedMetricsClient
from mcp_metrics.recorder import backoff_delay

from .conftest import API_KEY, IngestServer, async_wait_until, make_client

pytestmark = pytest.mark.anyio


def test_backoff_delay_doubles_up_to_the_cap_with_full_jitter() -> None:
    upper = [backoff_delay(n, 0.1, 5.0, uniform=lambda a, b: b) for n in range(9)]
    assert upper == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    lower = [backoff_delay(n, 0.1, 5.0, uniform=lambda a, b: a) for n in range(9)]
    assert lower == pytest.approx([0.05] * 9)
    rng = random.Random(7)
    for n in range(12):
        for _ in range(50):
            delay = backoff_delay(n, 0.1, 5.0, uniform=rng.uniform)
            assert 0.05 <= delay <= min(5.0, 0.1 * 2**n)
    # Retry-After wins, with at most a tenth (and at most 1 s) of jitter on top.
    assert backoff_delay(0, 0.1, 5.0, 30.0, uniform=lambda a, b: b) == pytest.approx(31.0)
    assert backoff_delay(9, 0.1, 5.0, 2.0, uniform=lambda a, b: b) == pytest.approx(2.2)


class _Unsent(Recorder):
    """A recorder whose sender loop the test drives by hand: no thread, no network, no clock."""

    def _wake(self) -> None:
        pass

    def _set_idle(self, idle: bool) -> None:
        pass


def _response(status: int, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body or {}, request=httpx.Request("POST", "http://x"))


def test_the_sender_loop_backs_off_exponentially_and_keeps_the_key() -> None:
    recorder = _Unsent(
        url="http://x", api_key=API_KEY, service="mw-test", backoff_base_s=0.1, backoff_max_s=1.0
    )
    recorder._random = lambda a, b: b  # the top of each jitter range: the cap itself
    recorder.record_custom("flaky")
    recorder.record_custom("flaky too")
    recorder._drain = True
    steps = recorder._sender()
    step = next(steps)
    backoffs, keys = [], []
    for _ in range(6):
        assert step.kind == "post" and step.part is not None
        keys.append(step.part.key)
        step = steps.send(_response(500))
        assert step.kind == "backoff"
        backoffs.append(step.seconds)
        step = steps.send(None)
    assert backoffs == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert step.kind == "post" and step.part is not None
    keys.append(step.part.key)
    assert len(set(keys)) == 1 and len(keys[0]) >= 16
    step = steps.send(_response(200, {"accepted": 2, "rejected": 0, "errors": []}))
    assert step.kind == "wait"
    stats = recorder.stats()
    assert (stats.sent, stats.retries, stats.in_flight) == (2, 6, 0)
    # The next batch gets a new key, and a success resets the backoff.
    recorder.record_custom("next")
    step = steps.send(False)  # the flush interval passed: a partial batch goes
    assert step.kind == "post" and step.part is not None and step.part.key != keys[0]
    step = steps.send(httpx.ConnectError("refused"))
    assert step.kind == "backoff" and step.seconds == pytest.approx(0.1)


def test_non_finite_values_drop_only_their_event(
    ingest: IngestServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = ThreadedMetricsClient(
        url=ingest.url, api_key=API_KEY, service="mw-test", register_atexit=False
    )
    with caplog.at_level(logging.WARNING, logger="mcp_metrics"):
        client.record_custom("good", value=1)
        client.record_custom("nan", value=math.nan)
        client.record_custom("inf", value=math.inf)
        client.record_custom("dim", ratio=-math.inf)
        client.record_custom("meta", metadata={"nested": {"x": [1.0, math.nan]}})
        client.record_custom("good too", value=2, duration_ms=math.nan)  # fixed: 0.0
        assert client.flush(5)
    assert [r.status for r in ingest.requests] == [200]
    assert [m["dimensions"]["name"] for m in ingest.accepted] == ["good", "good too"]
    assert ingest.accepted[1]["duration_ms"] == 0.0
    stats = client.stats()
    assert (stats.sent, stats.dropped_invalid, stats.rejected) == (2, 4, 0)
    assert len([r for r in caplog.records if "NaN or infinite" in r.getMessage()]) == 1
    client.close()


async def test_overflow_drops_oldest_and_host_keeps_going(down_ingest: IngestServer) -> None:
    client = make_client(down_ingest.url, max_queue_size=50, max_batch_size=10)
    for i in range(500):
        client.record_custom("burst", value=i)  # returns at once, service down or not
    stats = client.stats()
    assert stats.recorded == 500
    assert stats.queued == 50
    assert stats.dropped_overflow + stats.queued + stats.in_flight == 500
    assert stats.dropped_overflow >= 440
    down_ingest.start()
    await async_wait_until(lambda: client.stats().queued == 0 and client.stats().in_flight == 0)
    values = sorted(m["value"] for m in down_ingest.accepted)
    assert values[-50:] == list(range(450, 500))  # the newest survived
    await client.aclose()


async def test_large_batches_are_split_under_one_mebibyte(ingest: IngestServer) -> None:
    async with make_client(ingest.url, max_batch_size=10, flush_interval_s=60) as client:
        for i in range(6):
            client.record_custom("big", value=i, metadata={"blob": "x" * 300_000})
    sizes = [len(r.body["metrics"]) for r in ingest.requests]
    assert sum(sizes) == 6 and len(sizes) >= 2
    assert client.stats().sent == 6


async def test_record_never_raises(ingest: IngestServer) -> None:
    async with make_client(ingest.url) as client:
        client.record_custom("odd", metadata={"obj": object()}, thing=object(), long="y" * 1000)
        client.record("custom", duration_ms=-5)
        assert await client.flush(5)
    odd, negative = ingest.accepted
    assert odd["metadata"]["obj"].startswith("<object")
    assert len(odd["dimensions"]["long"]) == 256
    assert negative["duration_ms"] == 0.0
