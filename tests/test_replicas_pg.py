"""Replicas of the service on one real PostgreSQL: start-up errors that name the variable, keys
shared within a second, three replicas behind HAProxy losing and duplicating nothing when one is
killed, one rate limit across them through Redis, and PostgreSQL restarted under load."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metrics_service.storage.postgres.listener import APPLICATION_NAME
from tests._acked import tagged
from tests._helpers import (
    ADMIN_KEY,
    INGEST_KEY,
    RedisServer,
    ServiceProcess,
    clean_env,
    cli,
    free_port,
    payload,
    wait_for,
)
from tests._servers import PG_PASSWORD, PostgresServer, Replicas
from tests.test_ratelimit import burst

pytestmark = pytest.mark.slow
INGEST = {"X-API-Key": INGEST_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}


def replica(tmp_path: Path, url: str, name: str, **env: str) -> ServiceProcess:
    return ServiceProcess(
        db_path=tmp_path / f"{name}-unused.db",
        env={
            "METRICS_DATABASE_URL": url,
            "METRICS_API_KEY_SVC": INGEST_KEY,
            "METRICS_ADMIN_API_KEY": ADMIN_KEY,
            **env,
        },
        log_path=tmp_path / f"{name}.log",
    )


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()


def stored_ids(server: PostgresServer, url: str) -> Counter[int]:
    database = url.rsplit("/", 1)[1]
    out = server.psql("SELECT metadata::jsonb->>'id' FROM metrics", database=database)
    return Counter(int(v) for v in out.split() if v)


# -- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://metrics:{pw}@127.0.0.1/metrics", "unsupported scheme"),
        ("postgresql://metrics:{pw}@127.0.0.1:{port}/metrics", "cannot connect"),
        ("postgresql://metrics:wrong-{pw}@127.0.0.1:{cluster}/metrics", "cannot connect"),
    ],
    ids=["bad-scheme", "unreachable", "wrong-password"],
)
def test_start_up_fails_naming_the_variable_never_the_password(
    url: str, says: str, postgres_cluster: PostgresServer, tmp_path: Path
) -> None:
    value = url.format(pw=PG_PASSWORD, port=free_port(), cluster=postgres_cluster.port)
    result = subprocess.run(
        [sys.executable, "-m", "metrics_service", "serve"],
        env={
            **clean_env(),
            "METRICS_DATABASE_URL": value,
            "METRICS_SERVICE_PORT": "0",
            "OTEL_PROMETHEUS_PORT": "0",
            "METRICS_API_KEY_SVC": INGEST_KEY,
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "METRICS_DATABASE_URL" in output and says in output, output
    assert PG_PASSWORD not in output
    assert "Traceback" not in output


# -- keys --------------------------------------------------------------------------------------


def refused_within_a_second(service: ServiceProcess, key: dict[str, str]) -> None:
    """``key`` is refused by ``service`` within a second of now (polled, never slept on)."""
    since = time.monotonic()

    def refused() -> bool:
        r = httpx.post(f"{service.url}/metrics", json=payload("team-x"), headers=key)
        return r.status_code == 401

    wait_for(refused, timeout_s=1.0, interval_s=0.02)
    assert time.monotonic() - since < 1.0


def accepted(service: ServiceProcess, key: dict[str, str]) -> bool:
    r = httpx.post(f"{service.url}/metrics", json=payload("team-x"), headers=key)
    return r.status_code == 200


def keys_cli(tmp_path: Path, url: str, *args: str) -> str:
    """``metrics-service keys ARGS`` against ``url``, as an operator runs it; its output."""
    done = cli(tmp_path / "cli-unused.db", "keys", *args, env={"METRICS_DATABASE_URL": url})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def cli_key(tmp_path: Path, url: str, *args: str) -> tuple[int, dict[str, str]]:
    """Run ``keys create`` or ``keys rotate``; the id and secret of the key it printed."""
    out = keys_cli(tmp_path, url, *args)
    key_id = int(out.split(" key ", 1)[1].split()[0])
    return key_id, {"X-API-Key": out.split("\n\n")[1].strip()}


def test_keys_changed_through_one_replica_or_the_cli_reach_the_other_within_a_second(
    tmp_path: Path, postgres_url: str, replicas: list[ServiceProcess]
) -> None:
    # The default METRICS_KEY_RELOAD_INTERVAL_S (2 s): the change notice (LISTEN/NOTIFY) is what
    # makes every change below take effect within the second.
    a = replica(tmp_path, postgres_url, "a").start()
    replicas.append(a)
    b = replica(tmp_path, postgres_url, "b").start()
    replicas.append(b)
    created = httpx.post(
        f"{a.url}/admin/keys", json={"role": "ingest", "service": "team-x"}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    key = {"X-API-Key": created.json()["key"]}
    # Created on A: accepted by B at once (an unknown key reloads the table first).
    assert accepted(b, key)
    revoked = httpx.delete(f"{a.url}/admin/keys/{created.json()['id']}", headers=ADMIN)
    assert revoked.status_code == 200
    refused_within_a_second(b, key)

    # The CLI, a process of its own, neither replica: revoke, then rotate.
    key_id, key = cli_key(tmp_path, postgres_url, "create", "--service", "team-x")
    assert accepted(a, key) and accepted(b, key)
    keys_cli(tmp_path, postgres_url, "revoke", str(key_id))
    refused_within_a_second(b, key)
    refused_within_a_second(a, key)

    key_id, old = cli_key(tmp_path, postgres_url, "create", "--service", "team-x")
    assert accepted(b, old)
    _, new = cli_key(tmp_path, postgres_url, "rotate", str(key_id))
    refused_within_a_second(b, old)
    assert accepted(b, new)


def listener_pid(server: PostgresServer, url: str) -> int | None:
    database = url.rsplit("/", 1)[1]
    out = server.psql(
        "SELECT pid FROM pg_stat_activity"
        f" WHERE application_name = '{APPLICATION_NAME}' AND datname = '{database}'",
        database=database,
    )
    pids = [int(v) for v in out.split()]
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


def test_a_replica_whose_listening_connection_is_killed_listens_again(
    tmp_path: Path,
    postgres_url: str,
    postgres_cluster: PostgresServer,
    replicas: list[ServiceProcess],
) -> None:
    # The periodic reload is an hour away: only the change notice can refuse the key in time.
    b = replica(tmp_path, postgres_url, "b", METRICS_KEY_RELOAD_INTERVAL_S="3600").start()
    replicas.append(b)
    first = wait_for(lambda: listener_pid(postgres_cluster, postgres_url), 30)
    killed = postgres_cluster.psql(f"SELECT pg_terminate_backend({first})", database="postgres")
    assert killed.strip() == "t"
    second = wait_for(
        lambda: (pid := listener_pid(postgres_cluster, postgres_url)) not in (None, first) and pid,
        30,
    )
    assert second != first
    key_id, key = cli_key(tmp_path, postgres_url, "create", "--service", "team-x")
    assert accepted(b, key)
    keys_cli(tmp_path, postgres_url, "revoke", str(key_id))
    refused_within_a_second(b, key)
    assert "key listener" in (tmp_path / "b.log").read_text()


# -- three replicas behind HAProxy ----------------------------------------------------------


class Sender:
    """Clients posting tagged metrics through the balancer, each batch under an
    ``Idempotency-Key`` and retried with it until acknowledged (as the middleware does)."""

    def __init__(self, url: str, threads: int = 4, batch: int = 20) -> None:
        self.url = url
        self.batch = batch
        self.acked: list[int] = []
        self.statuses: Counter[int] = Counter()
        self.failures = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Sender:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                with self._lock:
                    ids = [next(self._ids) for _ in range(self.batch)]
                body = payload(metrics=[tagged(i) for i in ids])
                headers = {**INGEST, "Idempotency-Key": f"batch-{ids[0]}"}
                for _ in range(200):
                    try:
                        r = http.post("/metrics", json=body, headers=headers)
                    except httpx.HTTPError:
                        with self._lock:
                            self.failures += 1
                        time.sleep(0.05)
                        continue
                    with self._lock:
                        self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        with self._lock:
                            self.acked += ids
                        break
                    time.sleep(0.05)


def test_kill_9_of_a_replica_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, postgres_url: str, postgres_cluster: PostgresServer
) -> None:
    group = Replicas(tmp_path, postgres_url, 3).start()
    try:
        sender = Sender(group.url).start()
        wait_for(lambda: len(sender.acked) >= 400, 60)
        victim = group.services[1]
        victim.kill9()
        before = len(sender.acked)
        wait_for(lambda: len(sender.acked) >= before + 400, 60)
        sender.stop()
    finally:
        group.stop()
    stored = stored_ids(postgres_cluster, postgres_url)
    missing = [i for i in sender.acked if stored[i] == 0]
    duplicated = [i for i, n in stored.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged metrics missing, e.g. {missing[:5]}"
    assert not duplicated, f"duplicated: {duplicated[:5]}"
    assert len(sender.acked) >= 800
    # Stored but never acknowledged: at most the batches in flight when the senders stopped.
    assert len(set(stored) - set(sender.acked)) <= 4 * 20


def test_a_shared_rate_limit_is_exact_across_three_replicas(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    env = {"METRICS_RATE_LIMIT": "40", "METRICS_RATE_LIMIT_STORAGE_URI": redis_server.url}
    group = Replicas(tmp_path, postgres_url, 3, env=env).start()
    try:
        urls = [s.url for s in group.services]
        counts = asyncio.run(burst(urls, 150))
        assert counts == {200: 40, 429: 110}
        through = httpx.post(f"{group.url}/metrics", json=payload(), headers=INGEST)
        assert through.status_code == 429 and int(through.headers["retry-after"]) >= 1
    finally:
        group.stop()


# -- PostgreSQL restarted under load ---------------------------------------------------------


def test_postgres_restarted_under_load_503_with_retry_after_then_recovery(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.url()
    service = replica(tmp_path, url, "r").start()
    try:
        sender = Sender(service.url, threads=3, batch=10).start()
        wait_for(lambda: len(sender.acked) >= 200, 60)
        postgres_server.stop()
        down: list[httpx.Response] = []

        def refused() -> bool:
            r = httpx.post(f"{service.url}/metrics", json=payload(), headers=INGEST, timeout=30)
            if r.status_code == 503:
                down.append(r)
            return bool(down)

        wait_for(refused, 30, 0.1)
        ready = httpx.get(f"{service.url}/ready", timeout=10)
        assert ready.status_code == 503
        assert int(down[0].headers["retry-after"]) >= 1
        assert down[0].json()["error"]["code"]
        postgres_server.start()
        before = len(sender.acked)
        wait_for(lambda: len(sender.acked) >= before + 200, 60)
        wait_for(lambda: httpx.get(f"{service.url}/ready").status_code == 200, 30)
        sender.stop()
        assert service.proc is not None and service.proc.poll() is None
    finally:
        service.stop()
    stored = stored_ids(postgres_server, url)
    missing = [i for i in sender.acked if stored[i] == 0]
    assert not missing, f"{len(missing)} acknowledged metrics missing"
    assert not [i for i, n in stored.items() if n > 1]
    assert sender.statuses[503] >= 1


# -- Prometheus over every replica ----------------------------------------------------------


def test_prometheus_sum_over_the_replicas_equals_the_rows_stored(
    tmp_path: Path, postgres_url: str, postgres_cluster: PostgresServer
) -> None:
    from tests._prometheus import start_prometheus

    group = Replicas(tmp_path, postgres_url, 3).start()
    try:
        with httpx.Client(base_url=group.url, headers=INGEST, timeout=10) as http:
            for start in range(0, 300, 25):
                body = payload(metrics=[tagged(i) for i in range(start, start + 25)])
                assert http.post("/metrics", json=body).status_code == 200
        database = postgres_url.rsplit("/", 1)[1]
        rows = int(postgres_cluster.psql("SELECT count(*) FROM metrics", database=database))
        tools = int(postgres_cluster.psql("SELECT count(*) FROM tool_metrics", database=database))
        assert rows == 300
        targets = [f"127.0.0.1:{s.prometheus_port}" for s in group.services]
        with start_prometheus(tmp_path, targets) as prom:
            prom.wait_for_series('up{job="target"} == 1')

            def summed(promql: str) -> float | None:
                return prom.value(promql)

            wait_for(lambda: summed("sum(metrics_service_metrics_accepted_total)") == rows, 30)
            assert summed("sum(mcp_tool_executions_total)") == tools
            # Every replica took a share (round-robin): each one's counter is below the sum.
            shares = prom.values("sum by (instance) (metrics_service_metrics_accepted_total)")
            assert len(shares) == 3 and all(0 < v < rows for v in shares)
    finally:
        group.stop()
