"""Span ingest (``POST /v1/traces``) against event ingest (``POST /metrics``) for the same calls.

    .venv/bin/python bench/otlp_ingest.py [--batch 100] [--concurrency 8] [--duration 8] [--runs 3]

The same tool calls (``tools/call`` of 20 tools, one in ten a ``tool_error``, server spans with
the attributes the mcp SDK sets plus session and transport) are sent three ways to a real service
process on a fresh database: as ``/metrics`` JSON events, as OTLP/HTTP protobuf and as OTLP/JSON,
``--batch`` per request over ``--concurrency`` keep-alive connections for ``--duration`` seconds.
Reported per way (median of ``--runs``): requests/s, calls/s stored, latency p50/p99, server CPU
per stored call, and the rows counted after shutdown against the calls acknowledged. Then, in
this process, the CPU per call of each decoding path alone (minimum of 7 rounds): the ``/metrics``
validator, and OTLP decode + mapping + validation, for protobuf and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _workload import free_port  # noqa: E402

from tests._spans import SpanSpec, mcp, otlp_json, protobuf  # noqa: E402

KEY = "bench-otlp-key-0123456789abcdefghijklmnop"
TOOLS = [f"tool-{i}" for i in range(20)]


def calls(n: int, start: int) -> list[SpanSpec]:
    t0 = time.time_ns() - 60_000_000_000
    return [
        mcp(
            "tools/call",
            TOOLS[i % len(TOOLS)],
            error_type="tool_error" if i % 10 == 0 else None,
            session=f"s{i // 50}",
            at_ns=t0 + i * 1000,
            duration_ms=12.5,
        )
        for i in range(start, start + n)
    ]


def event_body(spans: list[SpanSpec]) -> bytes:
    metrics = [
        {
            "type": "tool_execution",
            "timestamp": s.end_ns / 1e9,
            "duration_ms": (s.end_ns - s.start_ns) / 1e6,
            "dimensions": {
                "method": "tools/call",
                "tool_name": s.attributes["gen_ai.tool.name"],
                "success": "error.type" not in s.attributes,
                "server_name": "bench",
                "transport": "stdio",
                "session_id": s.attributes["mcp.session.id"],
                "protocol_version": s.attributes["mcp.protocol.version"],
                **({"error_type": "tool_error"} if "error.type" in s.attributes else {}),
            },
            "metadata": {"trace_id": s.trace_id, "span_id": s.span_id},
        }
        for s in spans
    ]
    return json.dumps({"service": "bench", "version": "1", "metrics": metrics}).encode()


WAYS: dict[str, tuple[str, str, Any]] = {
    "/metrics (JSON events)": ("/metrics", "application/json", event_body),
    "/v1/traces (protobuf)": (
        "/v1/traces",
        "application/x-protobuf",
        lambda s: protobuf(s, {"service.name": "bench"}),
    ),
    "/v1/traces (OTLP/JSON)": (
        "/v1/traces",
        "application/json",
        lambda s: otlp_json(s, {"service.name": "bench"}),
    ),
}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    url: str, path: str, kind: str, bodies: list[bytes], concurrency: int, duration_s: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    ok = 0
    deadline = time.monotonic() + duration_s
    headers = {"Content-Type": kind, "X-API-Key": KEY}
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal ok
        while time.monotonic() < deadline:
            body = bodies[next(counter) % len(bodies)]
            started = time.perf_counter()
            r = await client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            ok += r.status_code == 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, ok


def run_once(way: str, args: argparse.Namespace) -> dict[str, float]:
    path, kind, encode = WAYS[way]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "m.db"
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("METRICS_", "OTEL_"))},
            "SQLITE_DB_PATH": str(db),
            "METRICS_SERVICE_PORT": str(port),
            "OTEL_PROMETHEUS_PORT": str(free_port()),
            "METRICS_API_KEY_BENCH": KEY,
            "METRICS_RATE_LIMIT": "100000000",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "metrics_service", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not start")
                time.sleep(0.05)
            # Distinct span ids per request, as real exports have (bodies reused round-robin).
            bodies = [encode(calls(args.batch, i * args.batch)) for i in range(64)]
            cpu_before = cpu_s(proc.pid)
            started = time.monotonic()
            latencies, ok = asyncio.run(
                drive(url, path, kind, bodies, args.concurrency, args.duration)
            )
            elapsed = time.monotonic() - started
            cpu = cpu_s(proc.pid) - cpu_before
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        stored = sqlite3.connect(db).execute("SELECT count(*) FROM tool_metrics").fetchone()[0]
    latencies.sort()
    return {
        "requests_s": len(latencies) / elapsed,
        "calls_s": ok * args.batch / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "cpu_us_per_call": cpu / max(stored, 1) * 1e6,
        "acked": ok * args.batch,
        "stored": stored,
    }


def decode_costs(batch: int) -> dict[str, float]:
    """CPU per call of each decoding path alone, in this process (min of 7 rounds)."""
    from metrics_service import Settings, otlp
    from metrics_service.validation import Validator

    settings = Settings(db_path=Path(tempfile.gettempdir()) / "unused.db")

    class _Telemetry:
        def add(self, *args: Any) -> None:
            pass

    class _App:
        validator = Validator(settings)
        flows = otlp.Flows()
        telemetry = _Telemetry()

    _App.settings = settings  # type: ignore[attr-defined]
    spans = calls(batch, 0)
    events, pb, js = event_body(spans), protobuf(spans), otlp_json(spans)
    paths = {
        "/metrics validator": lambda: _App.validator.decode(events),
        "OTLP protobuf decode+map": lambda: otlp.map_spans(
            _App,  # type: ignore[arg-type]
            otlp.decode_protobuf(pb),
            "svc",
        ),
        "OTLP/JSON decode+map": lambda: otlp.map_spans(
            _App,  # type: ignore[arg-type]
            otlp.decode_json(js),
            "svc",
        ),
    }
    out = {}
    for name, fn in paths.items():
        best = float("inf")
        for _ in range(7):
            _App.flows = otlp.Flows()
            started = time.thread_time()
            for _ in range(20):
                fn()
            best = min(best, time.thread_time() - started)
        out[name] = best / (20 * batch) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"batch {args.batch}, concurrency {args.concurrency}, {args.duration:g} s x {args.runs}")
    print(f"{'way':26} {'req/s':>8} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/call':>12}")
    for way in WAYS:
        runs = [run_once(way, args) for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lost = [r for r in runs if r["stored"] != r["acked"]]
        print(
            f"{way:26} {med['requests_s']:8.0f} {med['calls_s']:9.0f} {med['p50_ms']:7.1f}"
            f" {med['p99_ms']:7.1f} {med['cpu_us_per_call']:12.1f}"
            + ("  (stored != acknowledged!)" if lost else "")
        )
    print("\ndecoding alone, CPU per call (us):")
    for name, us in decode_costs(args.batch).items():
        print(f"  {name:28} {us:6.1f}")


if __name__ == "__main__":
    main()
