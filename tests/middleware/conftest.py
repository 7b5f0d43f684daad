"""Fixtures for the client middleware tests.

`ingest` is a real HTTP server on a loopback port that speaks the `POST /metrics` contract and can
be told to answer 429/503/4xx or to go away; `metrics_service` runs the real service as a
subprocess. Waiting is always on a condition with a deadline, never on a bare sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp_metrics import MetricsClient

from tests._ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789abcdef0123456789abcdef"


def make_client(url: str, **options: Any) -> MetricsClient:
    """An async client of the test service with short intervals (tests that wait on delivery)."""
    options.setdefault("flush_interval_s", 0.05)
    options.setdefault("backoff_base_s", 0.05)
    options.setdefault("backoff_max_s", 0.2)
    return MetricsClient(url=url, api_key=API_KEY, service="mw-test", version="1.2.3", **options)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process this test started, by its handle; kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    reply: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False


_METRIC_TYPES = ("auth_request", "tool_execution", "tool_discovery", "protocol_latency", "custom")
_REQUIRED = {
    "auth_request": ("success",),
    "tool_execution": ("method", "success"),
    "protocol_latency": ("flow_step",),
}
_IDEMPOTENCY_KEY = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,255}$")
MAX_BODY_BYTES = 1024 * 1024


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _item_error(i: int, metric: Any) -> tuple[str, str] | None:
    """(field, rule) of the first reason the real service would reject item ``i``, or None."""
    if not isinstance(metric, dict):
        return f"metrics[{i}]", "type"
    if metric.get("type") not in _METRIC_TYPES:
        return f"metrics[{i}].type", "enum"
    for name in ("value", "duration_ms"):
        value = metric.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metrics[{i}].{name}", "type"
        if value < 0 and name == "duration_ms":
            return f"metrics[{i}].{name}", "range"
    dims = metric.get("dimensions", {})
    if not isinstance(dims, dict):
        return f"metrics[{i}].dimensions", "type"
    for name in _REQUIRED.get(metric["type"], ()):
        if dims.get(name) is None:
            return f"metrics[{i}].dimensions.{name}", "required"
    if metric.get("metadata") is not None and not isinstance(metric["metadata"], dict):
        return f"metrics[{i}].metadata", "type"
    return None


@dataclass
class IngestServer:
    """A loopback HTTP server implementing `POST /metrics`, scriptable per request.

    It refuses what the real service refuses (checked against it in test_exactly_once.py and
    the end-to-end tests): a wrong key (401), a service it does not know (403), another content
    type (415), a body over 1 MiB (413), JSON with NaN/Infinity or not JSON (400), a malformed
    `Idempotency-Key` (400), items of unknown type or bad values (rejected by index, field and
    rule; 422 when none is valid). A batch replayed with a key it has answered gets the first
    answer again (`Idempotent-Replayed: true`) and is not accepted twice.
    """

    port: int
    requests: list[Received] = field(default_factory=list)
    # Each scripted reply is (status, headers); when empty, answer as the service would.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    reject_types: set[str] = field(default_factory=set)
    drop_replies: int = 0  # process this many requests, then close without answering
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _answers: dict[str, tuple[bytes, int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """The metrics stored: of each first 200 answer, the items not rejected."""
        with self._lock:
            out = []
            for r in self.requests:
                if r.status != 200 or r.replayed:
                    continue
                bad = {e["index"] for e in r.reply.get("errors", [])}
                out.extend(m for i, m in enumerate(r.body["metrics"]) if i not in bad)
            return out

    def answer(self, headers: Any, raw: bytes) -> tuple[int, dict[str, Any], dict[str, Any], bool]:
        """(status, parsed body or {}, reply, replayed) as the real service would answer."""

        def error(status: int, code: str, field_: str = "", rule: str = "") -> Any:
            details = [{"field": field_, "rule": rule, "message": code}] if field_ else []
            return status, {}, {"error": {"code": code, "message": code, "details": details}}, False

        if headers.get("X-API-Key") != API_KEY:
            return error(401, "unauthorized")
        if (headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return error(415, "unsupported_media_type")
        if len(raw) > MAX_BODY_BYTES:
            return error(413, "payload_too_large")
        key = headers.get("Idempotency-Key")
        if key is not None:
            key = key.strip()
            if len(key) >= 2 and key[0] == key[-1] == '"':
                key = key[1:-1]
            if not _IDEMPOTENCY_KEY.match(key):
                return error(400, "invalid_idempotency_key", "Idempotency-Key", "charset")
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError:
            return error(400, "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("metrics"), list):
            return error(422, "validation_failed", "metrics", "required")
        if not isinstance(body.get("service"), str):
            return error(422, "validation_failed", "service", "required")
        if body.get("version") is not None and not isinstance(body["version"], str):
            return error(422, "validation_failed", "version", "type")
        if body.get("service") not in SERVICE_NAMES:
            return error(403, "forbidden")
        if not 1 <= len(body["metrics"]) <= 1000:
            return error(422, "validation_failed", "metrics", "length")
        with self._lock:
            if key is not None and key in self._answers:
                first_raw, status, reply = self._answers[key]
                if first_raw != raw:
                    return error(422, "idempotency_key_reused", "Idempotency-Key", "same_body")
                return status, body, reply, True
        errors = []
        for i, metric in enumerate(body["metrics"]):
            problem = _item_error(i, metric)
            if problem is None and metric["type"] in self.reject_types:
                problem = (f"metrics[{i}].type", "enum")
            if problem is not None:
                errors.append({"index": i, "field": problem[0], "rule": problem[1], "message": ""})
        accepted = len(body["metrics"]) - len(errors)
        reply = {"accepted": accepted, "rejected": len(errors), "errors": errors}
        status = 200 if accepted else 422
        if key is not None and accepted:
            with self._lock:
                self._answers[key] = (raw, status, reply)
        return status, body, reply, False

    def start(self) -> None:
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with ingest._lock:
                    scripted = ingest.script.pop(0) if ingest.script else None
                if scripted is not None:
                    status, headers = scripted
                    body = json.loads(raw, parse_constant=_refuse_constant)
                    reply: dict[str, Any] = {"accepted": 0, "rejected": 0, "errors": []}
                    replayed = False
                else:
                    status, body, reply, replayed = ingest.answer(self.headers, raw)
                    headers = {"Idempotent-Replayed": "true"} if replayed else {}
                data = json.dumps(reply).encode()
                with ingest._lock:
                    drop = ingest.drop_replies > 0
                    ingest.drop_replies -= drop
                    ingest.requests.append(
                        Received(
                            time.monotonic(),
                            dict(self.headers),
                            body,
                            status,
                            reply,
                            replayed,
                        )
                    )
                self.close_connection = True
                if drop:
                    return  # the request was handled; the answer is lost
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                # No keep-alive, so that stop() really takes the service away.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


@pytest.fixture
def ingest() -> Iterator[IngestServer]:
    server = IngestServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def down_ingest() -> Iterator[IngestServer]:
    """An ingest server on a reserved port that is not listening yet: call `.start()`."""
    server = IngestServer(free_port())
    yield server
    server.stop()


# -- the real metrics service ---------------------------------------------------------------


@dataclass
class RunningService:
    url: str
    db_path: Path
    api_keys: dict[str, str]
    prometheus_port: int = 0

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Samples of ``name`` on the service's Prometheus endpoint: label set -> value.

        A small parser of the text format, so that the mcp 1.x venv needs no prometheus_client.
        """
        text = httpx.get(f"http://127.0.0.1:{self.prometheus_port}/metrics", timeout=5).text
        found: dict[frozenset[tuple[str, str]], float] = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or match["name"] != name:
                continue
            labels = frozenset((k, v) for k, v in _LABEL.findall(match["labels"] or "") if v)
            found[labels] = float(match["value"])
        return found

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def wait_rows(
        self, sql: str, params: tuple[Any, ...] = (), count: int = 1, timeout: float = 20.0
    ) -> list[sqlite3.Row]:
        """Rows once at least `count` exist (the service flushes its write queue on a timer)."""
        found: list[sqlite3.Row] = []

        def enough() -> bool:
            nonlocal found
            try:
                found = self.rows(sql, params)
            except sqlite3.OperationalError:  # file or table not there yet
                return False
            return len(found) >= count

        wait_until(enough, timeout, f"{count} row(s) for {sql!r}; last saw {len(found)}")
        return found


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# The service may run on another interpreter than the tests; scripts/test-installed runs both
# from wheels installed in a fresh venv (MIDDLEWARE_TEST_INSTALLED=1: nothing from the tree).
SERVICE_PYTHON = os.environ.get("MIDDLEWARE_TEST_SERVICE_PYTHON") or sys.executable
INSTALLED = os.environ.get("MIDDLEWARE_TEST_INSTALLED") == "1"


def _service_unavailable_reason() -> str | None:
    if not (REPO_ROOT / "metrics_service" / "__main__.py").exists():
        return "metrics_service is not built yet (no metrics_service/__main__.py)"
    probe = subprocess.run(
        [SERVICE_PYTHON, "-c", "import metrics_service"],
        cwd=None if INSTALLED else REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return (
            f"metrics_service does not import with {SERVICE_PYTHON} "
            "(pip install -e . there, or set MIDDLEWARE_TEST_SERVICE_PYTHON)"
        )
    return None


SERVICE_NAMES = ("mw-test", "mw-auth", "mw-registry", "mw-mcp")


def start_service(
    tmp: Path, port: int, keys: dict[str, str], prometheus_port: int | None = None
) -> tuple[subprocess.Popen[bytes], RunningService]:
    """Start `python -m metrics_service serve` on `port`, storing into `tmp/m.db`, and wait
    until it is ready. The caller stops the process (`stop_process`, or SIGKILL)."""
    prometheus_port = prometheus_port or free_port()
    env = {
        **os.environ,
        "SQLITE_DB_PATH": str(tmp / "m.db"),
        "METRICS_SERVICE_HOST": "127.0.0.1",
        "METRICS_SERVICE_PORT": str(port),
        "OTEL_PROMETHEUS_PORT": str(prometheus_port),
        "METRICS_FLUSH_INTERVAL_S": "0.2",  # the service's write-queue flush, not the client's
    }
    if not INSTALLED:
        env["PYTHONPATH"] = str(REPO_ROOT)
    for name, key in keys.items():
        env["METRICS_API_KEY_" + name.upper().replace("-", "_")] = key
    log_path = tmp / "service.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [SERVICE_PYTHON, "-m", "metrics_service", "serve"],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"metrics service exited with {proc.returncode}: "
                + log_path.read_text(errors="replace")[-2000:]
            )
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30, "the metrics service to be ready")
    except BaseException:
        stop_process(proc)
        raise
    return proc, RunningService(url, tmp / "m.db", keys, prometheus_port)


@contextmanager
def run_service(tmp: Path, port: int, keys: dict[str, str]) -> Iterator[RunningService]:
    """`python -m metrics_service serve` on `port`, storing into `tmp/m.db`, for the block."""
    proc, service = start_service(tmp, port, keys)
    try:
        yield service
    finally:
        stop_process(proc)


def service_keys() -> dict[str, str]:
    return {name: f"{name}-key-{os.urandom(16).hex()}" for name in SERVICE_NAMES}


@pytest.fixture(scope="session")
def metrics_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    reason = _service_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with run_service(
        tmp_path_factory.mktemp("metrics-service"), free_port(), service_keys()
    ) as svc:
        yield svc


@pytest.fixture
def service_runner(tmp_path: Path) -> Callable[[int, dict[str, str]], Any]:
    """Start a fresh service later in a test: `with service_runner(port, keys) as svc: ...`."""
    reason = _service_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return lambda port, keys: run_service(tmp_path, port, keys)


@pytest.fixture
def anyio_backend() -> str:
    # The async client runs its sender as an asyncio task.
    return "asyncio"


@pytest.fixture(scope="session")
def npm_tools() -> Any:
    """`@modelcontextprotocol/server-everything` and the Inspector CLI, from the pinned lock."""
    from ._npm import install

    tools = install()
    if isinstance(tools, str):
        pytest.skip(tools)
    return tools
