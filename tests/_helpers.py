"""Test helpers: a real service process, a real redis-server, conditions awaited with deadlines."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._ports import free_port, listening_ports

__all__ = ["free_port", "listening_ports"]  # re-exported: the tests import them from here too

ROOT = Path(__file__).resolve().parent.parent
INGEST_KEY = "test-ingest-key-0123456789abcdefghijklmnop"
OTHER_KEY = "test-other-key-0123456789abcdefghijklmnopq"
ADMIN_KEY = "test-admin-key-0123456789abcdefghijklmnopq"
#: Table names and values that try SQL injection (admin paths, query parameters, bodies).
INJECTIONS = [
    "tool_metrics; DROP TABLE api_keys",
    "tool_metrics' OR '1'='1",
    "tool_metrics--",
    "api_keys",
    "sqlite_master",
    "metrics WHERE 1=1",
    '"; DELETE FROM custom_metrics; --',
]


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def clean_env() -> dict[str, str]:
    """The process environment without any setting of ours, so tests start from defaults."""
    prefixes = ("METRICS_", "SQLITE_", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def run_bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` to completion from the repository root with default settings;
    fail with its stderr unless it exits 0; return its stdout."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def payload(
    service: str = "svc", metrics: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {"service": service, "version": "1.0.0", "metrics": metrics or [custom(1)], **extra}


def custom(value: float, **dims: Any) -> dict[str, Any]:
    return {"type": "custom", "value": value, "dimensions": dims}


def auth_event(
    success: bool = True, method: str = "jwt", duration_ms: float = 12.5
) -> dict[str, Any]:
    return {
        "type": "auth_request",
        "value": 1,
        "duration_ms": duration_ms,
        "dimensions": {"success": success, "method": method, "server": "auth-1", "user_hash": "u1"},
    }


def tool_event(tool: str = "search", success: bool = True) -> dict[str, Any]:
    return {
        "type": "tool_execution",
        "duration_ms": 30.0,
        "dimensions": {
            "method": "tools/call",
            "tool_name": tool,
            "server_name": "srv",
            "client_name": "claude",
            "client_version": "1.2",
            "success": success,
            "input_size_bytes": 120,
            "output_size_bytes": 2048,
        },
        "metadata": {"tenant_id": "acme", "input_tokens": 10},
    }


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@dataclass
class ServiceProcess:
    """``metrics-service serve`` as a real process on a free loopback port."""

    db_path: Path
    env: dict[str, str]
    log_path: Path
    port: int = 0  # 0: the service binds any free port; ``port`` is the real one once started
    prometheus_port: int | None = None  # its Prometheus endpoint, once started
    args: list[str] = field(default_factory=list)
    unset_env: list[str] = field(default_factory=list)  # variables to leave out (defaults apply)
    python: str = sys.executable  # another venv's, to run what it has installed
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServiceProcess:
        env = {
            **clean_env(),
            "SQLITE_DB_PATH": str(self.db_path),
            "METRICS_SERVICE_HOST": "127.0.0.1",
            "METRICS_SERVICE_PORT": "0",
            "OTEL_PROMETHEUS_PORT": "0",
            **self.env,
        }
        for name in self.unset_env:
            env.pop(name, None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [self.python, "-m", "metrics_service", "serve", *self.args],
            env=env,
            stdout=log,
            stderr=log,
            cwd=self.db_path.parent,
        )
        log.close()

        proc = self.proc
        prometheus = env.get("OTEL_PROMETHEUS_ENABLED", "true").lower() not in ("false", "0")

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"service exited with {proc.returncode}:\n{self.log()}")
            ports = listening_ports(proc.pid)
            if len(ports) < (2 if prometheus else 1):
                return False
            api, ready = None, False
            for port in ports:  # which one is the API: it answers /ready with JSON
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                except httpx.HTTPError:
                    return False
                if r.headers.get("content-type", "").startswith("application/json"):
                    api, ready = port, r.status_code == 200
            if api is None or not ready:
                return False
            self.port = api
            self.prometheus_port = next(iter(ports - {api}), None)
            return True

        wait_for(up, timeout_s, 0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} not installed: apt-get install -y {package}")
    return path


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


def start_redis(workdir: Path, attempts: int = 5) -> RedisServer:
    """A redis-server of our own on a free loopback port. redis-server cannot bind port 0, so
    the port is picked in advance; if another process took it first, ours exits and the next
    port is tried (a PING alone could be answered by that other server)."""
    binary = require_binary("redis-server", "redis-server")
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def settled(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
            return proc.poll() is not None or port in listening_ports(proc.pid)

        wait_for(settled, 10)
        if proc.poll() is None:
            return RedisServer(port, proc)
    raise AssertionError(f"redis-server found no free port in {attempts} attempts")


def cli(
    db: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m metrics_service ARGS`` on the database ``db``."""
    env = {**clean_env(), "SQLITE_DB_PATH": str(db), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "metrics_service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
