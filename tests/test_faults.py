"""Faults around a real service process: a full disk, a database locked by another process,
slow and silent clients. Acknowledged metrics are never lost and no request gets a 500.

(kill -9 and SIGTERM under load: tests/test_ingest.py; a collector down or black-holing:
tests/test_telemetry_otlp.py.)"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests._acked import assert_all_acked_stored_once, tagged
from tests._helpers import ADMIN_KEY, INGEST_KEY, ServiceProcess, wait_for
from tests._helpers import payload as envelope

H = {"X-API-Key": INGEST_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}
PAD = "p" * 1500  # metadata padding, so that each request needs fresh WAL pages


class Poster:
    """Posts batches of tagged metrics with unique ids; remembers the ids that got a 2xx."""

    def __init__(self, client: httpx.Client, batch: int = 50, pad: str = "") -> None:
        self.client = client
        self.batch = batch
        self.pad = pad
        self.next_id = 0
        self.acked: list[int] = []
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()

    def post(self) -> httpx.Response:
        with self._lock:
            ids = range(self.next_id, self.next_id + self.batch)
            self.next_id += self.batch
        metrics = [tagged(i) for i in ids]
        if self.pad:
            for m in metrics:
                m["metadata"]["pad"] = self.pad
        r = self.client.post("/metrics", json=envelope(metrics=metrics), headers=H)
        with self._lock:
            self.statuses[r.status_code] += 1
            if 200 <= r.status_code < 300:
                assert r.json()["accepted"] == self.batch, r.text
                self.acked.extend(ids)
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "unavailable"
        return r


# -- disk full ------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs, so that the database's disk really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def disk_service(tmpfs: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service with its database on the tmpfs; stopped before the tmpfs is unmounted."""
    proc = ServiceProcess(
        db_path=tmpfs / "m.db",
        env={
            "METRICS_API_KEY_SVC": INGEST_KEY,
            "METRICS_RATE_LIMIT": "100000",
            "METRICS_COMMIT_RETRIES": "1",
        },
        log_path=tmp_path / "service.log",
    )
    yield proc
    proc.stop()


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (unbuffered, down to the last block)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 1 << 20
        while size >= 512:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("ack_mode", ["durable", "buffered"])
def test_disk_full_is_503_loses_nothing_and_recovers_by_itself(
    disk_service: ServiceProcess,
    tmpfs: Path,
    ack_mode: str,
    record_property: Callable[[str, object], None],
) -> None:
    disk_service.env.update(
        METRICS_ACK_MODE=ack_mode, METRICS_FLUSH_INTERVAL_S="0.1", METRICS_QUEUE_MAX_METRICS="1000"
    )
    disk_service.start()
    with httpx.Client(base_url=disk_service.url, timeout=30) as c:
        poster = Poster(c, batch=20, pad=PAD)
        for _ in range(3):
            assert poster.post().status_code == 200
        wait_for(lambda: c.get("/ready").status_code == 200)
        filler = fill(tmpfs)

        # Full: requests get 503 with Retry-After (durable: the commit failed; buffered: the
        # queue of acknowledged metrics filled up), never a 500.
        wait_for(lambda: poster.post().status_code == 503, 60, 0)
        assert set(poster.statuses) <= {200, 503}, poster.statuses

        # A commit can still fit into space SQLite already holds (a reused WAL), so the health
        # flag may flip back for a moment: await the failing state rather than sample it once.
        def unready() -> bool:
            ready = c.get("/ready")
            return ready.status_code == 503 and ready.json()["checks"]["commits_healthy"] is False

        wait_for(unready, 30, 0.05)
        assert "commit of" in disk_service.log() and "full" in disk_service.log()

        # Space returns: the service recovers by itself, without a restart.
        filler.unlink()
        wait_for(lambda: poster.post().status_code == 200, 30, 0.2)
        for _ in range(3):
            assert poster.post().status_code == 200
        wait_for(lambda: c.get("/ready").status_code == 200)
        assert set(poster.statuses) <= {200, 503}, poster.statuses
    disk_service.signal(signal.SIGTERM)
    assert disk_service.wait() == 0
    assert poster.statuses[503] >= 1 and len(poster.acked) >= 6 * 20
    assert_all_acked_stored_once(disk_service.db_path, poster.acked)
    assert "commits succeed again" in disk_service.log()
    record_property("statuses", dict(poster.statuses))
    record_property("acknowledged_checked", len(poster.acked))


# -- the database locked by another process ----------------------------------------------------


def _hold(conn: sqlite3.Connection, how: str) -> None:
    if how == "long read":
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM metrics").fetchall()
    elif how == "brief writer":
        # Another process writes for half a second, then commits: ingest waits for it.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE retention_policies SET enabled = enabled")
        threading.Timer(0.5, conn.execute, ("COMMIT",)).start()
    else:
        conn.execute(how)  # BEGIN IMMEDIATE / BEGIN EXCLUSIVE: a writer that does not commit
        conn.execute("UPDATE retention_policies SET enabled = enabled")


@pytest.mark.parametrize(
    ("how", "busy_timeout_ms", "expected"),
    [
        ("long read", 200, 200),
        ("brief writer", 5000, 200),
        ("BEGIN IMMEDIATE", 200, 503),
        ("BEGIN EXCLUSIVE", 200, 503),
    ],
)
def test_database_locked_by_another_process_is_never_a_500(
    service: ServiceProcess, how: str, busy_timeout_ms: int, expected: int
) -> None:
    service.env.update(
        METRICS_SQLITE_BUSY_TIMEOUT_MS=str(busy_timeout_ms), METRICS_COMMIT_RETRIES="1"
    )
    service.start()
    with httpx.Client(base_url=service.url, timeout=30) as c, ThreadPoolExecutor(4) as pool:
        poster = Poster(c, batch=10)
        assert poster.post().status_code == 200
        conn = sqlite3.connect(
            service.db_path, isolation_level=None, timeout=5, check_same_thread=False
        )
        try:
            _hold(conn, how)
            during = [f.result().status_code for f in [pool.submit(poster.post) for _ in range(8)]]
            admin = [c.get(path, headers=ADMIN) for path in ("/admin/db/stats", "/admin/keys")]
            admin.append(
                c.put(
                    "/admin/retention/policies/custom_metrics",
                    json={"retention_days": 30},
                    headers=ADMIN,
                )
            )
            ready = c.get("/ready").status_code
        finally:
            conn.close()
        # A reader never blocks the writer (WAL); a writer that finishes within the busy timeout
        # is waited for; one that holds the lock longer gets 503 + Retry-After, and so do admin
        # requests that need to write; readiness says so.
        assert during == [expected] * 8 and ready == expected
        assert {r.status_code for r in admin} <= {200, 503}, [r.text for r in admin]
        for r in admin:
            if r.status_code == 503:
                assert (
                    r.json()["error"]["code"] == "unavailable"
                    and int(r.headers["retry-after"]) >= 1
                )
        # The lock is gone: ingest works again without a restart.
        wait_for(lambda: poster.post().status_code == 200, 20, 0.1)
        assert c.get("/admin/db/stats", headers=ADMIN).status_code == 200
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert_all_acked_stored_once(service.db_path, poster.acked)
    assert "unhandled error" not in service.log()


# -- slow and silent clients -------------------------------------------------------------------


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Read until the server closes; return what it sent, or None if it was still open."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def _trickle(sock: socket.socket, data: bytes, interval_s: float, stop: threading.Event) -> float:
    """Send ``data`` a byte at a time; return how long until the server refused more."""
    started = time.monotonic()
    for byte in data:
        if stop.wait(interval_s):
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
    return time.monotonic() - started


def test_slow_and_silent_clients_are_cut_off_and_others_are_served(service: ServiceProcess) -> None:
    timeout_s = 1.0
    service.env["METRICS_REQUEST_TIMEOUT_S"] = str(timeout_s)
    service.start()
    body = (
        b'{"service": "svc", "version": "1", "metrics": ['
        + b'{"type": "custom"},' * 200
        + b'{"type": "custom"}]}'
    )
    body_head = (
        f"POST /metrics HTTP/1.1\r\nHost: x\r\nX-API-Key: {INGEST_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow_head = (
        f"POST /metrics HTTP/1.1\r\nHost: x\r\nX-API-Key: {INGEST_KEY}\r\n"
        f"X-Pad: {'a' * 500}\r\n\r\n"
    ).encode()
    stop = threading.Event()
    silent = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(100)]
    head_tricklers = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(5)]
    body_tricklers = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(5)]
    # A kept-alive connection that went silent after one request.
    kept = socket.create_connection(("127.0.0.1", service.port))
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    for s in body_tricklers:
        s.sendall(body_head)
    try:
        with ThreadPoolExecutor(len(head_tricklers) + len(body_tricklers)) as pool:
            heads = [pool.submit(_trickle, s, slow_head, 0.05, stop) for s in head_tricklers]
            bodies = [pool.submit(_trickle, s, body, 0.05, stop) for s in body_tricklers]
            # Meanwhile, everyone else is served.
            with httpx.Client(base_url=service.url, timeout=5) as c:
                poster = Poster(c, batch=5)
                for _ in range(20):
                    assert poster.post().status_code == 200
            # The tricklers are cut off at the deadline, long before they would have finished
            # (a byte every 50 ms: 26 s for the head, 4 s for the body).
            head_times = [f.result(timeout=30) for f in heads]
            body_times = [f.result(timeout=30) for f in bodies]
        assert max(head_times) < 10 * timeout_s, head_times
        assert max(body_times) < 10 * timeout_s, body_times
        for s in body_tricklers:
            answer = _closed_by_server(s, 10)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        for s in [*silent, *head_tricklers, kept]:
            assert _closed_by_server(s, 10) is not None, "the server kept an idle connection open"
    finally:
        stop.set()
        for s in [*silent, *head_tricklers, *body_tricklers, kept]:
            s.close()
    # Nothing of the tricklers' bodies was stored; everyone else's was.
    assert_all_acked_stored_once(service.db_path, poster.acked)
    with httpx.Client(base_url=service.url, timeout=5) as c:
        assert c.get("/health").status_code == 200
