"""The real servers the scale-out tests stand on: PostgreSQL as an unprivileged user, stopped by
PID; HAProxy spreading requests over service replicas and routing around one that died."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import httpx

from tests._helpers import INGEST_KEY, ServiceProcess, db_rows, payload, wait_for
from tests._servers import PG_USER, LoadBalancer, PostgresServer, running_postgres


def test_postgres_runs_unprivileged_on_loopback_and_stops_by_pid() -> None:
    with running_postgres() as server:
        owner = pwd.getpwuid(Path(f"/proc/{server.pid}").stat().st_uid).pw_name
        if os.geteuid() == 0:
            assert owner == "nobody"
        assert server.psql("SELECT current_user") == PG_USER
        assert server.psql("SHOW listen_addresses") == "127.0.0.1"
        # The unix socket lives in the temporary folder, not in /var/run/postgresql.
        assert (server.root / f".s.PGSQL.{server.port}").is_socket()
        pid, root = server.pid, server.root
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert not root.exists()


def test_a_database_per_test(postgres_url: str, postgres_cluster: PostgresServer) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    assert postgres_cluster.psql("SELECT current_database()", database=name) == name
    tables = postgres_cluster.psql(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database=name
    )
    assert tables == "0"


def test_haproxy_balances_replicas_and_routes_around_a_dead_one(tmp_path: Path) -> None:
    replicas = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        replicas.append(
            ServiceProcess(
                db_path=tmp_path / str(i) / "m.db",
                env={"METRICS_API_KEY_SVC": INGEST_KEY},
                log_path=tmp_path / f"{i}.log",
            ).start()
        )
    balancer = LoadBalancer(tmp_path, [f"127.0.0.1:{r.port}" for r in replicas]).start()
    try:
        headers = {"X-API-Key": INGEST_KEY}
        with httpx.Client(base_url=balancer.url, headers=headers, timeout=10) as http:
            for _ in range(10):
                assert http.post("/metrics", json=payload()).status_code in (200, 202)
            counts = [
                db_rows(r.db_path, "SELECT count(*) FROM custom_metrics")[0][0] for r in replicas
            ]
            assert counts == [5, 5]  # round-robin
            replicas[0].kill9()
            # Until the health check notices, a request to the dead replica is redispatched.
            for _ in range(10):
                assert http.post("/metrics", json=payload()).status_code in (200, 202)

            def all_on_second() -> bool:
                return (
                    db_rows(replicas[1].db_path, "SELECT count(*) FROM custom_metrics")[0][0] == 15
                )

            wait_for(all_on_second, 10)
    finally:
        balancer.stop()
        for r in replicas:
            r.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
