"""Real servers for the scale-out tests: PostgreSQL, HAProxy in front of service replicas.

PostgreSQL comes from Debian's ``postgresql`` package: ``initdb`` makes a cluster in a fresh
temporary folder and the postmaster is started on a free loopback port with its unix socket in
that folder. PostgreSQL refuses to run as root, so when the tests run as root (CI, the dev
machine) the cluster belongs to the unprivileged ``nobody`` user and both ``initdb`` and
``postgres`` run as it. The postmaster is our child process (``postgres`` itself rather than
``pg_ctl start``, which would daemonise it), so teardown stops it by its PID: SIGINT, PostgreSQL's
fast shutdown, then SIGKILL after a deadline.

The load balancer is Debian's ``haproxy`` in the foreground, round-robin over the replicas with
an HTTP health check on ``/ready``; a replica that is down is taken out within a few hundred ms.

A missing binary skips the test with the command that installs it (``scripts/test`` installs
them when run as root, so CI skips nothing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._helpers import ADMIN_KEY, INGEST_KEY, ServiceProcess, db_rows, free_port, wait_for

PG_USER = "metrics"
PG_PASSWORD = "pg-test-secret-8d1e"
#: The unprivileged account a root test run starts PostgreSQL as.
RUN_AS = "nobody"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary (they live in /usr/lib/postgresql/N/bin, not on PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    path = found[0] if found else shutil.which(name)
    if path is None:
        pytest.skip(f"PostgreSQL's {name} not installed: apt-get install -y postgresql")
    return path


def _as_user() -> dict[str, object]:
    """Popen arguments that drop root for PostgreSQL (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(RUN_AS)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in ``root`` (data, socket and log), listening on 127.0.0.1:port."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = PG_USER) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        args = [
            postgres_bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        for name, value in self.options.items():
            args += ["-c", f"{name}={value}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            args, stdout=log, stderr=log, cwd=self.root, **_as_user()
        )
        log.close()
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"postgres exited with {proc.returncode}:\n{self.log()}")
            return _accepts(self.port)

        wait_for(up, timeout_s, 0.05)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit) by PID."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def psql(self, sql: str, database: str = PG_USER) -> str:
        """Run ``sql`` with Debian's psql over TCP; the unaligned, tuples-only output."""
        out = subprocess.run(
            [
                postgres_bin("psql"),
                *("-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", database),
                *("-c", sql),
            ],
            env={**os.environ, "PGPASSWORD": PG_PASSWORD},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode != 0:
            raise AssertionError(f"psql failed: {out.stderr}")
        return out.stdout.strip()


def _accepts(port: int) -> bool:
    """The server answers the startup handshake (``pg_isready`` without the binary)."""
    result = subprocess.run(
        [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"],
        check=False,
    )
    return result.returncode == 0


def start_postgres(options: dict[str, str] | None = None, attempts: int = 5) -> PostgresServer:
    """initdb a fresh cluster (owner ``metrics``, password auth over TCP) and start it.

    ``options`` are server settings (``-c name=value``); the tests' default turns ``fsync`` off,
    which changes nothing they can observe (no test crashes the machine, only processes).
    """
    root = Path(tempfile.mkdtemp(prefix="metrics-pg-"))
    user = _as_user()
    if user:
        os.chown(root, int(str(user["user"])), int(str(user["group"])))
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if user:
        os.chown(pwfile, int(str(user["user"])), int(str(user["group"])))
    init = subprocess.run(  # type: ignore[call-overload]
        [
            postgres_bin("initdb"),
            "-D",
            str(root / "data"),
            "-U",
            PG_USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **user,
    )
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    settings = {"fsync": "off", "max_connections": "200", **(options or {})}
    last: AssertionError | None = None
    for _ in range(attempts):
        server = PostgresServer(root, free_port(), options=settings)
        try:
            server.start()
        except AssertionError as exc:  # the port was taken meanwhile: another one
            server.stop()
            last = exc
            continue
        # The database the URL names (its owner's own).
        server.psql(f"CREATE DATABASE {PG_USER}", database="postgres")
        return server
    shutil.rmtree(root, ignore_errors=True)
    raise AssertionError(f"postgres did not start: {last}")


@contextlib.contextmanager
def running_postgres(options: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    server = start_postgres(options)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


# -- the load balancer ---------------------------------------------------------------------


@dataclass
class LoadBalancer:
    """HAProxy on 127.0.0.1:port, round-robin over ``backends`` (``host:port``)."""

    root: Path
    backends: list[str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        servers = "\n".join(
            f"    server r{i} {address} check inter 200ms fall 1 rise 2"
            for i, address in enumerate(self.backends)
        )
        # Only connection failures are retried (and redispatched to another replica): a request
        # that reached a replica is never sent twice by the balancer.
        return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch

frontend api
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
{servers}
"""

    def log(self) -> str:
        path = self.root / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, attempts: int = 5) -> LoadBalancer:
        binary = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
        )
        if binary is None:
            pytest.skip("haproxy not installed: apt-get install -y haproxy")
        for _ in range(attempts):
            self.port = free_port()
            cfg = self.root / "haproxy.cfg"
            cfg.write_text(self.config())
            log = open(self.root / "haproxy.log", "ab")  # noqa: SIM115 - the process owns it
            self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=log)
            log.close()

            def up(proc: subprocess.Popen[bytes] = self.proc) -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return True
                except OSError:
                    return False

            wait_for(up, 10, 0.05)
            if self.proc.poll() is None:
                return self
        raise AssertionError(f"haproxy did not start:\n{self.log()}")

    def healthy(self) -> int:
        """How many replicas answer through the balancer's health view (GET /ready counts)."""
        count = 0
        for address in self.backends:
            try:
                if httpx.get(f"http://{address}/ready", timeout=1).status_code == 200:
                    count += 1
            except httpx.HTTPError:
                pass
        return count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Replicas:
    """N service processes on one PostgreSQL database, behind HAProxy."""

    root: Path
    database_url: str
    count: int = 3
    env: dict[str, str] = field(default_factory=dict)
    services: list[ServiceProcess] = field(default_factory=list)
    balancer: LoadBalancer | None = None

    def start(self) -> Replicas:
        for i in range(self.count):
            service = ServiceProcess(
                db_path=self.root / f"unused-{i}.db",
                env={
                    "METRICS_DATABASE_URL": self.database_url,
                    "METRICS_API_KEY_SVC": INGEST_KEY,
                    "METRICS_ADMIN_API_KEY": ADMIN_KEY,
                    **self.env,
                },
                log_path=self.root / f"replica-{i}.log",
            )
            self.services.append(service.start())
        self.balancer = LoadBalancer(
            self.root, [f"127.0.0.1:{s.port}" for s in self.services]
        ).start()
        balancer = self.balancer
        wait_for(lambda: _through(balancer.url), 10)
        return self

    @property
    def url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for service in self.services:
            service.stop()


def _through(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- reading what a test stored, on either backend -------------------------------------------


def _where(target: Any) -> tuple[str | None, Path]:
    """The PostgreSQL URL (or None) and SQLite file of ``target``: ``Settings``, a
    ``ServiceProcess`` (its ``METRICS_DATABASE_URL``) or a plain SQLite path."""
    if isinstance(target, Path):
        return None, target
    if isinstance(target, ServiceProcess):
        return target.env.get("METRICS_DATABASE_URL") or None, target.db_path
    return getattr(target, "database_url", None) or None, target.db_path


def on_postgres(target: Any) -> bool:
    """Whether ``target``'s database (``_where``) is a PostgreSQL one."""
    return _where(target)[0] is not None


def _on_postgres(url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncio

    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


def stored_rows(target: Any, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` from the database ``target`` points at (``_where``): SQLite's file
    (read-only), or PostgreSQL (asyncpg). Plain SQL that both dialects read the same (counts,
    columns) gives the same answer on both; ``jsonb`` comes back as its JSON text, as SQLite's
    JSON columns do."""
    url, path = _where(target)
    return _on_postgres(url, sql) if url else db_rows(path, sql)


def execute_sql(target: Any, sql: str) -> None:
    """Run a statement that writes (a test moving a clock column back) and commit it."""
    url, path = _where(target)
    if url:
        _on_postgres(url, sql)
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        conn.execute(sql)


# -- fixtures (conftest.py loads this module as a plugin) ----------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One PostgreSQL server per test process; each test gets its own database on it."""
    with running_postgres() as server:
        yield server


def new_database(server: PostgresServer, template: str | None = None) -> Iterator[str]:
    """Yield the URL of a new database on ``server`` (empty, or a copy of ``template``), then
    drop it: a generator to drive from a fixture of any scope."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    # FILE_COPY copies the template's files (after a checkpoint, cheap with fsync off): several
    # times faster for a small database than the default WAL_LOG, which logs every block.
    copy = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
    server.psql(f"CREATE DATABASE {name}{copy}", database="postgres")
    yield server.url(name)
    server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", database="postgres")


@pytest.fixture
def postgres_url(postgres_cluster: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database (dropped afterwards, connections and all)."""
    yield from new_database(postgres_cluster)


@pytest.fixture(scope="session")
def postgres_template(postgres_cluster: PostgresServer) -> str:
    """A database migrated to the latest schema once per test process (the backend's own
    ``open``), that ``postgres_migrated_url`` copies."""
    import asyncio

    from metrics_service.storage.postgres import Backend

    name = "t_template"
    postgres_cluster.psql(f"CREATE DATABASE {name}", database="postgres")

    async def migrate() -> None:
        backend = Backend(None, postgres_cluster.url(name))
        await backend.open()
        await backend.close()

    asyncio.run(migrate())
    return name


@pytest.fixture
def postgres_databases(
    postgres_cluster: PostgresServer, postgres_template: str
) -> Iterator[Callable[[], str]]:
    """A factory of new databases already at the latest schema: copies of the template, much
    cheaper than migrating each (all dropped afterwards)."""
    made: list[Iterator[str]] = []

    def new() -> str:
        made.append(new_database(postgres_cluster, postgres_template))
        return next(made[-1])

    yield new
    for database in made:
        next(database, None)


@pytest.fixture
def postgres_migrated_url(postgres_databases: Callable[[], str]) -> str:
    """The URL of a new database at the latest schema (``postgres_databases``)."""
    return postgres_databases()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop or kill it."""
    with running_postgres() as server:
        yield server
