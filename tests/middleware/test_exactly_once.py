"""Exactly once, end to end: the real client, the real service, faults in between.

A loopback proxy of the tests' own sits between the client and the service. Per request it
passes the exchange through, or forwards the whole request, waits for the service's answer and
drops it (resetting the client's connection: the batch was stored, the client cannot know), or
forwards half the request and resets both sides. Meanwhile the service is killed with kill -9
and restarted on the same port and database. Every event carries a unique id in its metadata;
the ids are counted in the database at the end: every event the client reported as sent is
stored exactly once. With the spool on, the client process itself is killed with kill -9 and
restarted: every event a record() call had returned for is stored exactly once.

Each test prints its counts (sent, stored, duplicates, lost, faults) on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp_metrics import ThreadedMetricsClient

from .conftest import (
    API_KEY,
    REPO_ROOT,
    IngestServer,
    RunningService,
    _service_unavailable_reason,
    free_port,
    service_keys,
    start_service,
    stop_process,
)

PASS, DROP_ANSWER, RESET_REQUEST = "pass", "drop_answer", "reset_request"


@dataclass
class FaultyProxy:
    """HTTP/1.1 over loopback, one upstream connection per request, a fault chosen per request."""

    upstream_port: int
    port: int = field(default_factory=free_port)
    faults: tuple[str, ...] = (PASS, PASS, DROP_ANSWER, PASS, RESET_REQUEST)
    seen: Counter[str] = field(default_factory=Counter)
    _rng: random.Random = field(default_factory=lambda: random.Random(17))
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            server = loop.run_until_complete(
                asyncio.start_server(self._client, "127.0.0.1", self.port)
            )
            ready.set()
            try:
                loop.run_forever()
            finally:
                server.close()
                loop.run_until_complete(server.wait_closed())
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return head, await reader.readexactly(length)

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head, body = await self._read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                fault = self._rng.choice(self.faults)
                try:
                    up_reader, up_writer = await asyncio.open_connection(
                        "127.0.0.1", self.upstream_port
                    )
                except OSError:
                    self.seen["service_down"] += 1
                    self._reset(writer)
                    return
                try:
                    if fault == RESET_REQUEST:
                        up_writer.write((head + body)[: (len(head) + len(body)) // 2])
                        await up_writer.drain()
                        self.seen[fault] += 1
                        self._reset(up_writer)
                        self._reset(writer)
                        return
                    up_writer.write(head + body)
                    await up_writer.drain()
                    try:
                        answer_head, answer_body = await self._read_message(up_reader)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        self.seen["service_died"] += 1  # killed while handling it
                        self._reset(writer)
                        return
                    if b"idempotent-replayed: true" in answer_head.lower():
                        self.seen["replayed"] += 1
                    if fault == DROP_ANSWER:
                        self.seen[fault] += 1  # the service answered; the client never hears
                        self._reset(writer)
                        return
                    self.seen[PASS] += 1
                    writer.write(answer_head + answer_body)
                    await writer.drain()
                finally:
                    up_writer.close()
        except ConnectionError:
            return
        finally:
            writer.close()


@dataclass
class KillableService:
    """The real service on a fixed port and database, which the test kills with SIGKILL."""

    tmp: Path
    keys: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    info: RunningService | None = None
    kills: int = 0

    def start(self) -> KillableService:
        self.proc, self.info = start_service(self.tmp, self.port, self.keys)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)

    def ids(self) -> Counter[str]:
        assert self.info is not None
        rows = self.info.rows("SELECT json_extract(metadata, '$.eid') AS eid FROM custom_metrics")
        return Counter(str(r["eid"]) for r in rows)


@pytest.fixture
def killable(tmp_path: Path) -> Iterator[KillableService]:
    reason = _service_unavailable_reason()
    if reason:
        pytest.skip(reason)
    service = KillableService(tmp_path, service_keys())
    yield service
    service.stop()


def _report(name: str, sent: int, stored: Counter[str], accepted: set[str], extra: Any) -> None:
    duplicates = sum(n - 1 for n in stored.values() if n > 1)
    lost = len(accepted - set(stored))
    print(
        f"\n{name}: sent={sent} stored={sum(stored.values())} unique={len(stored)} "
        f"duplicates={duplicates} lost={lost} {extra}"
    )


def _kill_and_restart(service: KillableService, stop: threading.Event, times: int) -> None:
    """Kill the service with kill -9 `times` times, a moment apart, restarting it each time."""
    for _ in range(times):
        if stop.wait(0.8):
            return
        service.kill9()
        time.sleep(0.2)  # down for a moment: the client sees refused connections
        service.start()


def test_lost_answers_resets_and_kill_9_of_the_service_store_each_event_once(
    killable: KillableService,
) -> None:
    killable.start()
    total, writers = 4000, 4
    with FaultyProxy(killable.port) as proxy:
        client = ThreadedMetricsClient(
            url=proxy.url,
            api_key=killable.keys["mw-test"],
            service="mw-test",
            max_batch_size=50,
            flush_interval_s=0.05,
            backoff_base_s=0.05,
            backoff_max_s=0.4,
            timeout_s=5,
            max_queue_size=total,
            register_atexit=False,
        )
        stop = threading.Event()
        killer = threading.Thread(target=_kill_and_restart, args=(killable, stop, 3))
        killer.start()

        def write(n: int) -> None:
            for i in range(total // writers):
                client.record_custom("load", metadata={"eid": f"w{n}-{i}"})
                if i % 50 == 0:
                    time.sleep(0.01)  # spread over the kills, not one burst

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        killer.join(60)
        stop.set()
        assert client.flush(60), f"not delivered in time: {client.stats()}"
        stats = client.stats()
        client.close()
    stored = killable.ids()
    recorded = {f"w{n}-{i}" for n in range(writers) for i in range(total // writers)}
    _report("service kill -9", stats.sent, stored, recorded, dict(proxy.seen))
    assert stats.sent == total and stats.dropped_overflow == 0
    assert set(stored) == recorded  # none lost, none invented
    assert all(n == 1 for n in stored.values()), "an event was stored twice"
    assert killable.kills == 3
    # The faults happened, and retries of stored batches were answered as replays.
    assert proxy.seen[DROP_ANSWER] > 0 and proxy.seen[RESET_REQUEST] > 0
    assert proxy.seen["replayed"] > 0


_CHILD = """
import sys, time
from mcp_metrics import ThreadedMetricsClient

run, count = sys.argv[1], int(sys.argv[2])
client = ThreadedMetricsClient(
    max_batch_size=40, flush_interval_s=0.05, backoff_base_s=0.05, backoff_max_s=0.4,
    register_atexit=False,
)
print("recovered", client.stats().recovered, flush=True)
for i in range(count):
    eid = f"{run}-{i}"
    client.record_custom("spooled", metadata={"eid": eid})
    print("accepted", eid, flush=True)  # record() has returned: the event is in the spool
    time.sleep(0.002)
if count == 0:
    ok = client.flush(60)
    stats = client.stats()
    print("drained", ok, stats.queued + stats.in_flight, flush=True)
    client.close()
"""


def test_kill_9_of_the_client_with_the_spool_stores_each_accepted_event_once(
    killable: KillableService, tmp_path: Path
) -> None:
    killable.start()
    spool = tmp_path / "client-spool"
    accepted: set[str] = set()
    attempted: set[str] = set()
    recovered: list[int] = []
    rng = random.Random(5)
    with FaultyProxy(killable.port) as proxy:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT / "middleware"),
            "METRICS_SERVICE_URL": proxy.url,
            "METRICS_API_KEY": killable.keys["mw-test"],
            "METRICS_SERVICE_NAME": "mw-test",
            "METRICS_CLIENT_SPOOL_PATH": str(spool),
        }

        def child(run: str, count: int) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, "-c", _CHILD, run, str(count)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )

        for run in range(4):
            proc = child(f"r{run}", 100_000)
            assert proc.stdout is not None
            kill_after = rng.randint(300, 700)
            seen = 0
            for line in proc.stdout:
                kind, _, value = line.strip().partition(" ")
                if kind == "recovered":
                    recovered.append(int(value))
                elif kind == "accepted":
                    accepted.add(value)
                    seen += 1
                    if seen == kill_after:
                        os.kill(proc.pid, signal.SIGKILL)
                        break
            proc.wait(10)
            # Lines written before the kill landed: those events were accepted too.
            for line in proc.stdout.read().splitlines():
                kind, _, value = line.partition(" ")
                if kind == "accepted":
                    accepted.add(value)
                    seen += 1
            proc.stdout.close()
            assert proc.returncode == -signal.SIGKILL
            # The event being recorded when the kill came may or may not be in the spool.
            attempted |= {f"r{run}-{i}" for i in range(seen + 1)}
            if run == 1:
                killable.kill9()  # the service goes too, while the spool holds the backlog
                killable.start()
        last = child("final", 0)
        out, _ = last.communicate(timeout=120)
        assert last.returncode == 0, out
    lines = out.split("\n")
    recovered.append(int(lines[0].split()[1]))
    assert any(line.startswith("drained True 0") for line in lines), out
    stored = killable.ids()
    sent = sum(stored.values())
    _report(
        "client kill -9 with spool",
        sent,
        stored,
        accepted,
        {**proxy.seen, "recovered_per_start": recovered},
    )
    assert accepted <= set(stored), f"lost {len(accepted - set(stored))} accepted events"
    assert set(stored) <= attempted  # nothing invented
    assert all(n == 1 for n in stored.values()), "an event was stored twice"
    assert sum(recovered[1:]) > 0  # the restarts did find events in the spool
    assert proxy.seen[DROP_ANSWER] > 0


def test_the_fake_ingest_server_refuses_what_the_service_refuses(
    killable: KillableService,
) -> None:
    """The same requests to the real service and to tests' fake get the same status."""
    killable.start()
    assert killable.info is not None
    fake = IngestServer(free_port())
    fake.start()
    key = killable.keys["mw-test"]
    good = {"service": "mw-test", "version": "1", "metrics": [{"type": "custom", "value": 1}]}
    envelope = b'{"service":"mw-test","version":"1","metrics":'

    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("ok", json.dumps(good).encode(), {}),
        ("nan", envelope + b'[{"type":"custom","value":NaN}]}', {}),
        ("infinity", envelope + b'[{"type":"custom","value":-Infinity}]}', {}),
        ("not json", b"{", {}),
        ("no version", json.dumps({**good, "version": None}).encode(), {}),
        ("version not text", json.dumps({**good, "version": 3}).encode(), {}),
        ("no service", json.dumps({**good, "service": None}).encode(), {}),
        ("no metrics", envelope + b"[]}", {}),
        ("bad value", envelope + b'[{"type":"custom","value":"high"}]}', {}),
        ("bad key", json.dumps(good).encode(), {"Idempotency-Key": "has space"}),
        ("long key", json.dumps(good).encode(), {"Idempotency-Key": "k" * 256}),
        ("unknown type", envelope + b'[{"type":"nope"}]}', {}),
        ("partly bad", envelope + b'[{"type":"nope"},{"type":"custom"}]}', {}),
        ("text", json.dumps(good).encode(), {"Content-Type": "text/plain"}),
        ("other service", json.dumps({**good, "service": "nobody"}).encode(), {}),
        ("too large", envelope + b"[" + b" " * (1 << 20) + b"]}", {}),
    ]
    try:
        for name, body, extra in cases:
            statuses = []
            for url, api_key in ((killable.info.url, key), (fake.url, API_KEY)):
                headers = {"X-API-Key": api_key, "Content-Type": "application/json", **extra}
                r = httpx.post(url + "/metrics", content=body, headers=headers, timeout=10)
                statuses.append(r.status_code)
            assert statuses[0] == statuses[1], (name, statuses)
        # A replay with the same key: both answer 200, the second time as a replay.
        for url, api_key in ((killable.info.url, key), (fake.url, API_KEY)):
            headers = {"X-API-Key": api_key, "Idempotency-Key": "same"}
            first = httpx.post(url + "/metrics", json=good, headers=headers)
            again = httpx.post(url + "/metrics", json=good, headers=headers)
            other = httpx.post(url + "/metrics", json={**good, "version": "2"}, headers=headers)
            assert (first.status_code, again.status_code, other.status_code) == (200, 200, 422)
            assert again.headers["Idempotent-Replayed"] == "true"
    finally:
        fake.stop()
