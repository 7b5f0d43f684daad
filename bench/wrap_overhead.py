"""Latency that `mcp-metrics wrap` and `mcp-metrics proxy` add to one MCP call, on loopback.

    python bench/wrap_overhead.py [--calls N] [--warmup N]

stdio: a minimal JSON-RPC server (a Python loop answering each tools/call line) driven one
request at a time, started directly and through `mcp-metrics wrap`. HTTP: a minimal keep-alive
HTTP/1.1 server answering each POST with a JSON-RPC result, called directly and through
`mcp-metrics proxy`, with one httpx keep-alive client. Recording is on in both cases and goes to
a local ingest stub that accepts everything, so the observer, the client's queue and its sender
thread all run. Prints median and p99 per call for each path and the difference (the overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from _workload import free_port

MCP_METRICS = [str(Path(sys.executable).with_name("mcp-metrics"))]
if not Path(MCP_METRICS[0]).exists():
    MCP_METRICS = [sys.executable, "-m", "mcp_metrics.proxy"]

_STDIO_SERVER = r"""
import json, sys
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    req = json.loads(line)
    result = {"content": [{"type": "text", "text": "ok"}]}
    res = {"jsonrpc": "2.0", "id": req["id"], "result": result}
    out.write(json.dumps(res).encode() + b"\n"); out.flush()
"""

_BODY = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}]}}
).encode()


def _request(i: int) -> bytes:
    message = {"jsonrpc": "2.0", "id": i, "method": "tools/call"}
    message["params"] = {"name": "bench", "arguments": {"i": i}}
    return json.dumps(message).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without this, delayed ACKs add 40 ms per call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = _BODY if self.path != "/metrics" else b'{"accepted": 1, "rejected": 0}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def _http_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _stdio_run(argv: list[str], env: dict[str, str], calls: int, warmup: int) -> list[float]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    samples = []
    try:
        for i in range(warmup + calls):
            started = time.perf_counter()
            proc.stdin.write(_request(i))
            proc.stdin.flush()
            line = proc.stdout.readline()
            elapsed = time.perf_counter() - started
            assert json.loads(line)["id"] == i
            if i >= warmup:
                samples.append(elapsed * 1000.0)
    finally:
        proc.stdin.close()
        proc.wait(30)
    return samples


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _http_run(url: str, calls: int, warmup: int) -> list[float]:
    samples = []
    with httpx.Client() as http:
        for i in range(warmup + calls):
            body = _request(i)
            started = time.perf_counter()
            response = http.post(url, content=body, headers={"Content-Type": "application/json"})
            elapsed = time.perf_counter() - started
            assert response.status_code == 200
            if i >= warmup:
                samples.append(elapsed * 1000.0)
    return samples


def _report(name: str, direct: list[float], through: list[float]) -> None:
    d_med, d_p99 = _percentiles(direct)
    t_med, t_p99 = _percentiles(through)
    print(
        f"{name:6} direct median {d_med:.3f} ms p99 {d_p99:.3f} ms | metered median {t_med:.3f}"
        f" ms p99 {t_p99:.3f} ms | added median {t_med - d_med:.3f} ms p99 {t_p99 - d_p99:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    with _http_server() as ingest_port, _http_server() as upstream_port:
        env = {
            **os.environ,
            "METRICS_SERVICE_URL": f"http://127.0.0.1:{ingest_port}",
            "METRICS_API_KEY": "bench-key-0123456789abcdef0123456789",
            "METRICS_SERVICE_NAME": "bench",
            "METRICS_CLIENT_FLUSH_INTERVAL_S": "0.5",
        }
        child = [sys.executable, "-c", _STDIO_SERVER]
        run: Callable[[list[str]], list[float]] = lambda argv: _stdio_run(  # noqa: E731
            argv, env, args.calls, args.warmup
        )
        _report("stdio", run(child), run([*MCP_METRICS, "wrap", "--", *child]))

        listen = free_port()
        proxy = subprocess.Popen(
            [
                *MCP_METRICS,
                "proxy",
                "--listen",
                f"127.0.0.1:{listen}",
                "--upstream",
                f"http://127.0.0.1:{upstream_port}",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(listen)
            direct = _http_run(f"http://127.0.0.1:{upstream_port}/mcp", args.calls, args.warmup)
            through = _http_run(f"http://127.0.0.1:{listen}/mcp", args.calls, args.warmup)
        finally:
            proxy.terminate()
            proxy.wait(30)
        _report("http", direct, through)


if __name__ == "__main__":
    main()
