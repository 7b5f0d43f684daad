"""The application's lifecycle: what a failed start releases, how shutdown keeps its deadline
without blocking the event loop, and a readiness probe that leaves the writer alone."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.errors import ConfigError
from tests._helpers import INGEST_KEY, payload, wait_for

DB_THREADS = ("sqlite-writer", "sqlite-reader", "sqlite-probe")
#: aiosqlite's thread per connection (the reader and the probe) is named after its function.
AIOSQLITE_THREAD = "_connection_worker_thread"


def _db_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(DB_THREADS) or AIOSQLITE_THREAD in t.name
    ]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_failed_start_releases_the_prometheus_port_and_the_database_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_API_KEY_SVC", INGEST_KEY)
    monkeypatch.setenv("METRICS_API_KEY_BROKEN", "too-short")  # fails when the keys are read
    assert not _db_threads()
    app = create_app(Settings(db_path=tmp_path / "m.db"))
    with pytest.raises(ConfigError, match="METRICS_API_KEY_BROKEN"), TestClient(app):
        pass
    telemetry = app.state.metrics.telemetry
    # It got as far as serving the Prometheus endpoint and opening the database...
    assert telemetry.prometheus_port is not None
    assert (tmp_path / "m.db").exists()
    # ... and gave all of it back.
    assert _port_is_free(telemetry.prometheus_port)
    assert not _db_threads()
    # A fixed configuration starts on the same database and port.
    monkeypatch.delenv("METRICS_API_KEY_BROKEN")
    fixed = Settings(db_path=tmp_path / "m.db", otel_prometheus_port=telemetry.prometheus_port)
    with TestClient(create_app(fixed)) as c:
        assert (
            c.post("/metrics", json=payload(), headers={"X-API-Key": INGEST_KEY}).status_code == 200
        )
    assert not _db_threads()


def _black_hole() -> tuple[socket.socket, int]:
    """A listening socket that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server, server.getsockname()[1]


def test_shutdown_keeps_one_deadline_and_the_event_loop_running(tmp_path: Path) -> None:
    """The last OTLP export goes to a collector that never answers: shutdown still ends at
    METRICS_SHUTDOWN_TIMEOUT_S, and the event loop keeps running while the exporter waits."""
    server, port = _black_hole()
    settings = Settings(
        db_path=tmp_path / "m.db",
        otlp_endpoint=f"http://127.0.0.1:{port}",
        otlp_timeout_ms=60_000,
        shutdown_timeout_s=1.5,
    )
    app = create_app(settings)

    async def run() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with app.router.lifespan_context(app):
            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)
            before = ticks
            started = time.monotonic()
        elapsed = time.monotonic() - started
        ticker.cancel()
        return elapsed, ticks - before

    try:
        elapsed, ticks = asyncio.run(run())
    finally:
        server.close()
    # The deadline held (not the exporter's 60 s), and the loop ran through it: 10 ms ticks.
    assert 1.0 <= elapsed < 10, elapsed
    assert ticks >= 20, ticks
    assert not _db_threads()


def test_ready_leaves_the_writer_free_while_another_process_holds_the_lock(
    tmp_path: Path, keyed_env: None
) -> None:
    """The probe waits for the write lock on its own connection: with the lock held elsewhere
    /ready says the database is not writable, and the writer thread is free all the while."""
    settings = Settings(db_path=tmp_path / "m.db", sqlite_busy_timeout_ms=60_000)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.metrics  # type: ignore[attr-defined]
        writer = state.storage._writer  # the SQLite backend's writer thread
        # Retention's start-up run is the writer's own work: let it finish first.
        wait_for(lambda: state.retention.finished_runs >= 1)
        other = sqlite3.connect(settings.db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            r = c.get("/ready")
            assert r.status_code == 503, r.text
            assert r.json()["checks"]["database_writable"] is False, r.text

            async def writer_is_free() -> int:
                # Needs no lock; waits only if the writer thread is busy (e.g. in a probe
                # stuck on the 60 s busy timeout).
                return await asyncio.wait_for(
                    writer.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]), 10
                )

            assert c.portal.call(writer_is_free) == 1  # type: ignore[union-attr]
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert c.get("/ready").status_code == 200
