"""OTLP for tests: a receiver in the test process, and a real collector (``rotel-agent``) before it.

The receiver accepts ``POST /v1/metrics`` (``application/x-protobuf``, plain or gzip) and decodes it
with the official ``opentelemetry-proto`` messages, as any OTLP/HTTP backend does
(https://opentelemetry.io/docs/specs/otlp/#otlphttp). Usage::

    with OtlpReceiver() as receiver, start_rotel(tmp_path, receiver.url) as rotel:
        # export to rotel.grpc_endpoint or rotel.http_endpoint, then
        wait_for(lambda: receiver.latest("mcp_auth_requests"))
"""

from __future__ import annotations

import gzip
import importlib.util
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from tests._helpers import clean_env, free_port, wait_for

ROTEL_VERSION = "0.0.1a15"


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class Point:
    """One data point with where it came from."""

    resource: dict[str, Any]
    scope: str
    metric: Metric
    attributes: dict[str, Any]
    point: Any  # NumberDataPoint | HistogramDataPoint | ...


def _points_of(metric: Metric) -> Any:
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind else []


class OtlpReceiver:
    """An OTLP/HTTP metrics backend on a free loopback port, storing every decoded request."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/metrics":
                    return self._answer(404, b"", f"path {self.path}")
                if self.headers.get("Content-Type", "").split(";")[0] != "application/x-protobuf":
                    return self._answer(
                        415, b"", f"content type {self.headers.get('Content-Type')}"
                    )
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = ExportMetricsServiceRequest()
                try:
                    request.ParseFromString(body)
                except Exception as exc:  # DecodeError: the test must see it, the client gets 400
                    return self._answer(400, b"", f"undecodable body: {exc!r}")
                with receiver._lock:
                    receiver.requests.append(request)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                self._answer(200, ExportMetricsServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes, refusal: str | None = None) -> None:
                if refusal is not None:
                    with receiver._lock:
                        receiver.refused.append(refusal)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # no access log in test output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL: OTLP/HTTP clients post to ``url + "/v1/metrics"``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def points(self, name: str) -> list[Point]:
        """Every data point of metric ``name`` received so far, in arrival order."""
        with self._lock:
            requests = list(self.requests)
        out: list[Point] = []
        for request in requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            out.extend(
                                Point(resource, sm.scope.name, metric, attributes(p.attributes), p)
                                for p in _points_of(metric)
                            )
        return out

    def latest(self, name: str) -> dict[frozenset[tuple[str, Any]], Point]:
        """The newest point of ``name`` per attribute set (cumulative exports repeat the totals)."""
        latest: dict[frozenset[tuple[str, Any]], Point] = {}
        for p in self.points(name):
            key = frozenset(p.attributes.items())
            if key not in latest or p.point.time_unix_nano >= latest[key].point.time_unix_nano:
                latest[key] = p
        return latest

    def names(self) -> set[str]:
        with self._lock:
            requests = list(self.requests)
        return {
            m.name
            for r in requests
            for rm in r.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }


def rotel_binary() -> str:
    """The ``rotel-agent`` executable shipped in the ``rotel`` wheel; skip when not installed."""
    spec = importlib.util.find_spec("rotel")  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "rotel-agent" if locations else None
    if path is None or not path.is_file():
        pytest.skip(f"rotel not installed: .venv/bin/pip install rotel=={ROTEL_VERSION}")
    return str(path)


@dataclass
class Rotel:
    """A running ``rotel-agent``: OTLP in on gRPC and HTTP, OTLP/HTTP out to one receiver."""

    grpc_port: int
    http_port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        path = self.workdir / "rotel.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def start_rotel(workdir: Path, export_to: str, extra_args: Sequence[str] = ()) -> Iterator[Rotel]:
    """Run ``rotel-agent`` in the foreground, exporting metrics as OTLP/HTTP to ``export_to``.

    Its own pid and log files go to ``workdir`` (the defaults under /tmp would collide between
    parallel tests). Batches are flushed every 100 ms. ``extra_args`` go to ``rotel-agent start``.
    """
    binary = rotel_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in clean_env().items() if not k.startswith("ROTEL_")}
    with open(workdir / "rotel.out", "ab") as out:
        proc = subprocess.Popen(
            [
                binary, "start",
                "--log-format", "json",
                "--pid-file", str(workdir / "rotel.pid"),
                "--log-file", str(workdir / "rotel.log"),
                "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
                "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                "--exporter", "otlp",
                "--otlp-exporter-protocol", "http",
                "--otlp-exporter-endpoint", export_to,
                "--batch-timeout", "100ms",
                "--otlp-exporter-retry-initial-backoff", "100ms",
                "--otlp-exporter-retry-max-backoff", "500ms",
                *extra_args,
            ],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    rotel = Rotel(grpc_port, http_port, proc, workdir)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"rotel-agent exited with {proc.returncode}:\n{rotel.log()}")
            return _listening(grpc_port) and _listening(http_port)

        wait_for(up, 15, 0.05)
        yield rotel
    finally:
        rotel.stop()
