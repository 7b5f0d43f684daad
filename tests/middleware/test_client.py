"""The metrics client against a real loopback HTTP server: batching, retries, overflow, close."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from mcp_metrics import ClientConfig, MetricsClient, ThreadedMetricsClient

from .conftest import API_KEY, IngestServer, async_wait_until, make_client, wait_until

pytestmark = pytest.mark.anyio


async def test_delivers_envelope_headers_and_events(ingest: IngestServer) -> None:
    async with make_client(ingest.url, instance_id="host-1") as client:
        client.record_tool_execution(
            tool_name="add", success=True, duration_ms=3.5, client_name="c"
        )
        client.record_auth(success=False, method="jwt", server="auth", user_hash="abc")
        assert await client.flush(5)
    request = ingest.requests[0]
    assert request.headers["X-API-Key"] == API_KEY
    assert request.headers["Content-Type"] == "application/json"
    assert request.body["service"] == "mw-test"
    assert request.body["version"] == "1.2.3"
    assert request.body["instance_id"] == "host-1"
    tool, auth = request.body["metrics"]
    assert tool["type"] == "tool_execution"
    assert tool["duration_ms"] == 3.5
    assert tool["dimensions"] == {
        "method": "tools/call",
        "tool_name": "add",
        "success": True,
        "client_name": "c",
    }
    assert isinstance(tool["timestamp"], float) and abs(tool["timestamp"] - time.time()) < 60
    assert auth["type"] == "auth_request"
    assert auth["dimensions"]["success"] is False
    assert client.stats().sent == 2


async def test_batches_by_size_before_the_interval(ingest: IngestServer) -> None:
    client = make_client(ingest.url, max_batch_size=10, flush_interval_s=60)
    for i in range(25):
        client.record_custom("n", value=i)
    await async_wait_until(lambda: len(ingest.requests) >= 2, what="two full batches")
    assert [len(r.body["metrics"]) for r in ingest.requests] == [10, 10]
    await client.aclose()
    assert [len(r.body["metrics"]) for r in ingest.requests] == [10, 10, 5]
    assert [m["value"] for m in ingest.accepted] == list(range(25))


async def test_flushes_on_the_interval_without_close(ingest: IngestServer) -> None:
    client = make_client(ingest.url, max_batch_size=100, flush_interval_s=0.1)
    client.record_custom("one")
    await async_wait_until(lambda: client.stats().sent == 1, what="the interval flush")
    assert len(ingest.accepted) == 1
    await client.aclose()


async def test_service_down_then_up_delivers_later(down_ingest: IngestServer) -> None:
    client = make_client(down_ingest.url)
    for i in range(30):
        client.record_custom("queued", value=i)
    await async_wait_until(lambda: client.stats().retries >= 2, what="retries while down")
    stats = client.stats()
    assert stats.sent == 0
    assert stats.last_error is not None
    down_ingest.start()
    await async_wait_until(lambda: client.stats().sent == 30, what="delivery after recovery")
    assert sorted(m["value"] for m in down_ingest.accepted) == list(range(30))
    await client.aclose()
    assert client.stats().dropped_shutdown == 0


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(ingest: IngestServer, status: int) -> None:
    ingest.script.append((status, {"Retry-After": "1"}))
    client = make_client(ingest.url)
    client.record_custom("limited")
    await async_wait_until(lambda: client.stats().sent == 1, what="delivery after Retry-After")
    first, second = ingest.requests
    assert first.status == status and second.status == 200
    assert second.at - first.at >= 1.0
    assert client.stats().retries == 1
    await client.aclose()


async def test_server_errors_are_retried_with_the_same_key(ingest: IngestServer) -> None:
    ingest.script.extend([(500, {})] * 3)
    client = make_client(ingest.url)
    client.record_custom("flaky")
    await async_wait_until(lambda: client.stats().sent == 1, what="delivery")
    assert [r.status for r in ingest.requests] == [500, 500, 500, 200]
    assert len({r.headers["Idempotency-Key"] for r in ingest.requests}) == 1
    assert client.stats().retries == 3
    client.record_custom("second")
    assert await client.flush(5)
    assert (
        ingest.requests[-1].headers["Idempotency-Key"]
        != ingest.requests[0].headers["Idempotency-Key"]
    )
    assert [m["dimensions"]["name"] for m in ingest.accepted] == ["flaky", "second"]
    await client.aclose()


async def test_a_lost_answer_is_replayed_not_stored_twice(ingest: IngestServer) -> None:
    ingest.drop_replies = 2  # stored, then the connection closes before the answer
    client = make_client(ingest.url)
    for i in range(3):
        client.record_custom("once", value=i)
    await async_wait_until(lambda: client.stats().sent == 3, what="delivery after lost answers")
    assert [(r.status, r.replayed) for r in ingest.requests] == [
        (200, False),
        (200, True),
        (200, True),
    ]
    assert [m["value"] for m in ingest.accepted] == [0, 1, 2]
    assert client.stats().retries == 2
    await client.aclose()


@pytest.mark.parametrize("status", [400, 401, 403, 413, 415])
async def test_other_4xx_is_dropped_not_retried(
    ingest: IngestServer, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    ingest.script.extend([(status, {}), (status, {})])
    client = make_client(ingest.url)
    with caplog.at_level(logging.ERROR, logger="mcp_metrics"):
        client.record_custom("refused")
        await async_wait_until(lambda: client.stats().dropped_refused == 1, what="the drop")
        client.record_custom("refused again")
        await async_wait_until(lambda: client.stats().dropped_refused == 2, what="the 2nd drop")
        client.record_custom("accepted")
        assert await client.flush(5)
    assert [r.status for r in ingest.requests] == [status, status, 200]
    assert client.stats().retries == 0
    assert client.stats().sent == 1
    # logged once, not once per batch
    assert len([r for r in caplog.records if f"HTTP {status}" in r.getMessage()]) == 1
    await client.aclose()


async def test_partial_rejection_is_counted(ingest: IngestServer) -> None:
    ingest.reject_types.add("bogus")
    async with make_client(ingest.url) as client:
        client.record("bogus")
        client.record_custom("fine")
        assert await client.flush(5)
        stats = client.stats()
    assert (stats.sent, stats.rejected) == (1, 1)


async def test_422_counts_every_event_as_rejected(ingest: IngestServer) -> None:
    ingest.script.append((422, {}))
    async with make_client(ingest.url) as client:
        client.record("bogus")
        client.record("bogus")
        assert await client.flush(5)
    assert client.stats().rejected == 2
    assert len(ingest.requests) == 1


async def test_close_cuts_a_long_backoff_short(down_ingest: IngestServer) -> None:
    # Each retry would wait at least 300 s: only the close deadline can end the wait.
    client = make_client(down_ingest.url, backoff_base_s=600, backoff_max_s=600)
    for _ in range(20):
        client.record_custom("lost")
    await async_wait_until(lambda: client.stats().retries >= 1, what="a first failed attempt")
    await asyncio.wait_for(client.aclose(timeout_s=0.5), 60)
    assert client.stats().dropped_shutdown == 20
    client.record_custom("after close")  # a no-op, no error
    assert client.stats().recorded == 20
    await client.aclose()  # idempotent


async def test_inactive_without_url_or_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mcp_metrics"):
        client = MetricsClient(ClientConfig.from_env({}, service="x"))
    assert not client.enabled
    client.record_custom("ignored")
    assert client.stats().recorded == 0
    assert any("reporting is off" in r.getMessage() for r in caplog.records)
    await client.aclose()


def test_config_from_env_and_explicit_arguments_win() -> None:
    env = {
        "METRICS_SERVICE_URL": "http://metrics:8890/",
        "METRICS_API_KEY": "k" * 32,
        "METRICS_SERVICE_NAME": "from-env",
        "METRICS_CLIENT_MAX_BATCH_SIZE": "250",
        "METRICS_CLIENT_FLUSH_INTERVAL_S": "0.5",
        "METRICS_CLIENT_ENABLED": "yes",
    }
    cfg = ClientConfig.from_env(env, service="explicit")
    assert cfg.endpoint == "http://metrics:8890/metrics"
    assert cfg.service == "explicit"
    assert (cfg.max_batch_size, cfg.flush_interval_s, cfg.active) == (250, 0.5, True)
    assert cfg.instance_id  # defaults to host-pid
    with pytest.raises(ValueError, match="METRICS_CLIENT_FLUSH_INTERVAL_S"):
        ClientConfig.from_env({"METRICS_CLIENT_FLUSH_INTERVAL_S": "soon"})
    with pytest.raises(ValueError, match="max_batch_size"):
        ClientConfig.from_env({"METRICS_CLIENT_MAX_BATCH_SIZE": "5000"})
    assert not ClientConfig.from_env({**env, "METRICS_CLIENT_ENABLED": "false"}).active


def test_threaded_client_from_many_threads(ingest: IngestServer) -> None:
    client = ThreadedMetricsClient(
        url=ingest.url,
        api_key=API_KEY,
        service="mw-test",
        flush_interval_s=0.05,
        register_atexit=False,
    )

    def work(n: int) -> None:
        for i in range(100):
            client.record_custom("threaded", worker=n, value=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.flush(10)
    assert client.stats().sent == 400
    assert len(ingest.accepted) == 400
    client.close()
    client.close()


def test_threaded_client_down_then_up_and_bounded_close(down_ingest: IngestServer) -> None:
    client = ThreadedMetricsClient(
        url=down_ingest.url,
        api_key=API_KEY,
        service="mw-test",
        flush_interval_s=0.05,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        register_atexit=False,
    )
    client.record_custom("early")
    wait_until(lambda: client.stats().retries >= 1, what="a retry while down")
    down_ingest.start()
    wait_until(lambda: client.stats().sent == 1, what="delivery after recovery")
    down_ingest.stop()
    client.record_custom("late")
    closing = threading.Thread(target=client.close, kwargs={"timeout_s": 0.3})
    closing.start()
    closing.join(60)  # a hang guard; the close deadline itself is 0.3 s
    assert not closing.is_alive()
    assert client.stats().dropped_shutdown == 1
