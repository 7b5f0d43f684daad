"""Soak: a fixed rate of mixed traffic against a real service process, sampled over time.

    .venv/bin/python bench/soak.py [--duration-s 600] [--rate 50] [--batch 10] [--sample-s 10]

Starts ``metrics-service serve`` on a free loopback port with a fresh SQLite file, sends
``--rate`` requests a second (open loop: the schedule does not wait for answers), each a batch of
``--batch`` metrics mixed over the four MCP families (one request in 20 also carries an invalid
item, for the partial-success path), every metric with a unique id in its metadata. Every
``--sample-s`` it samples the server's RSS, open file descriptors (/proc/PID/fd), the WAL and
database sizes, the Prometheus scrape size and the latency p50/p99 of the requests of that
interval, and prints a row. At the end it stops the service with SIGTERM, checks that every
metric that got a 2xx is in the database exactly once and that ``PRAGMA integrity_check`` is ok,
and prints a flatness verdict: the slope of each resource over the second half of the run.

Exit status: 0 when nothing acknowledged was lost or duplicated and the service exited 0; 1
otherwise, or when ``--require-flat`` is given and a resource was not flat. The run is bounded
(at most 24 h), talks to 127.0.0.1 only, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _workload import free_port

KEY = "soak-ingest-key-0123456789abcdefghijklmnop"
SERVICE = "soak"
MAX_DURATION_S = 24 * 3600
FLOW_STEPS = ("initialize->tools/list", "tools/list->tools/call", "initialize->tools/call")
TOOLS = ("search", "read_file", "write_file", "fetch", "weather")

# Flat means, over the second half of the run against the first (the warm-up): RSS grows by at
# most 0.5 MiB a minute (30 MiB an hour); the open descriptors (a few per client connection) never
# exceed the first half's peak by more than 4; the WAL's peak stays within 1 MiB of the first
# half's (SQLite checkpoints it at about 4 MiB and reuses the file); the median p99 latency stays
# within twice the first half's plus 5 ms.
RSS_SLOPE_MAX_MIB_PER_MIN = 0.5
FD_GROWTH_MAX = 4
WAL_GROWTH_MAX_BYTES = 2**20


#: The printed table: title, width, cell.
COLUMNS: list[tuple[str, int, Callable[[dict[str, Any]], str]]] = [
    ("t_s", 6, lambda r: f"{r['t_s']:.0f}"),
    ("req/s", 7, lambda r: f"{r['requests_per_s']:.1f}"),
    ("rss_MiB", 8, lambda r: f"{r['rss_kib'] / 1024:.1f}"),
    ("fds", 4, lambda r: str(r["fds"])),
    ("wal_KiB", 8, lambda r: f"{r['wal_bytes'] / 1024:.0f}"),
    ("db_MiB", 7, lambda r: f"{r['db_bytes'] / 2**20:.1f}"),
    ("scrape_KiB", 10, lambda r: f"{r['scrape_bytes'] / 1024:.1f}"),
    ("p50_ms", 7, lambda r: f"{r['p50_ms']:.2f}"),
    ("p99_ms", 7, lambda r: f"{r['p99_ms']:.2f}"),
    ("non2xx", 6, lambda r: str(r["non_2xx"])),
]


def metric(rng: random.Random, ident: int) -> dict[str, Any]:
    """One metric of a random family, carrying ``ident`` in its metadata."""
    family = rng.randrange(4)
    meta = {"soak_id": ident}
    if family == 0:
        dims: dict[str, Any] = {
            "success": rng.random() > 0.1,
            "method": rng.choice(("jwt", "oauth", "noauth")),
            "server": f"auth-{rng.randrange(3)}",
            "user_hash": f"u{rng.randrange(10_000)}",
        }
        return {
            "type": "auth_request",
            "duration_ms": rng.uniform(1, 200),
            "dimensions": dims,
            "metadata": meta,
        }
    if family == 1:
        dims = {
            "method": "tools/call",
            "tool_name": rng.choice(TOOLS),
            "server_name": "srv",
            "client_name": rng.choice(("claude", "cursor")),
            "success": rng.random() > 0.05,
            "input_size_bytes": rng.randrange(10_000),
            "output_size_bytes": rng.randrange(100_000),
            "session_id": f"s{rng.randrange(1000)}",
        }
        meta.update(tenant_id="acme", input_tokens=rng.randrange(500))
        return {
            "type": "tool_execution",
            "duration_ms": rng.uniform(1, 2000),
            "dimensions": dims,
            "metadata": meta,
        }
    if family == 2:
        dims = {
            "query": f"find tool {rng.randrange(100_000)}",
            "results_count": rng.randrange(20),
            "top_k": 10,
            "embedding_time_ms": rng.uniform(1, 50),
            "search_time_ms": rng.uniform(0.1, 10),
        }
        return {
            "type": "tool_discovery",
            "duration_ms": rng.uniform(2, 80),
            "dimensions": dims,
            "metadata": meta,
        }
    dims = {"flow_step": rng.choice(FLOW_STEPS), "server_name": "srv", "client_name": "claude"}
    return {
        "type": "protocol_latency",
        "duration_ms": rng.uniform(1, 500),
        "dimensions": dims,
        "metadata": meta,
    }


@dataclass
class Window:
    """What happened between two samples."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)


@dataclass
class Traffic:
    rate: float
    batch: int
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    next_id: int = 0
    acked: list[int] = field(default_factory=list)
    sent: int = 0
    skipped: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)
    window: Window = field(default_factory=Window)

    def body(self) -> tuple[dict[str, Any], list[int]]:
        ids = list(range(self.next_id, self.next_id + self.batch))
        self.next_id += self.batch
        metrics = [metric(self.rng, i) for i in ids]
        if self.rng.random() < 0.05:
            metrics.append({"type": "custom", "value": "not a number", "metadata": {"soak_id": -1}})
        return {
            "service": SERVICE,
            "version": "1.0.0",
            "instance_id": "soak",
            "metrics": metrics,
        }, ids

    async def one(self, client: httpx.AsyncClient) -> None:
        body, ids = self.body()
        started = time.perf_counter()
        try:
            r = await client.post("/metrics", json=body, headers={"X-API-Key": KEY})
        except httpx.HTTPError as exc:
            status: int | str = type(exc).__name__
        else:
            status = r.status_code
            if r.status_code == 200:
                rejected = {e["index"] for e in r.json()["errors"]}
                self.acked.extend(i for n, i in enumerate(ids) if n not in rejected)
        self.window.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.window.statuses[status] += 1
        self.statuses[status] += 1

    async def run(self, client: httpx.AsyncClient, until: float, max_in_flight: int = 256) -> None:
        """Open loop: request i starts at start + i / rate, whatever the answers do."""
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while True:
            due = start + i / self.rate
            if due >= until:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            if len(tasks) >= max_in_flight:
                self.skipped += 1  # the service is this far behind: count it, do not pile on
                continue
            task = asyncio.create_task(self.one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            self.sent += 1
        if tasks:
            await asyncio.gather(*tasks)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def start_service(workdir: Path, port: int, prometheus_port: int) -> subprocess.Popen[bytes]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("METRICS_", "SQLITE_", "OTEL_"))
    }
    env.update(
        SQLITE_DB_PATH=str(workdir / "soak.db"),
        METRICS_SERVICE_HOST="127.0.0.1",
        METRICS_SERVICE_PORT=str(port),
        METRICS_API_KEY_SOAK=KEY,
        METRICS_RATE_LIMIT="10000000",
        OTEL_PROMETHEUS_HOST="127.0.0.1",
        OTEL_PROMETHEUS_PORT=str(prometheus_port),
    )
    log = open(workdir / "service.log", "ab")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "metrics_service", "serve"],
        env=env,
        stdout=log,
        stderr=log,
        cwd=workdir,
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the service exited with {proc.returncode}; see {workdir / 'service.log'}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the service did not become ready within 30 s")


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port, prometheus_port = free_port(), free_port()
    proc = start_service(workdir, port, prometheus_port)
    db = workdir / "soak.db"
    wal = workdir / "soak.db-wal"
    traffic = Traffic(args.rate, args.batch)
    samples: list[dict[str, Any]] = []
    print(" ".join(f"{title:>{width}}" for title, width, _ in COLUMNS), flush=True)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
            ) as client,
            httpx.AsyncClient(timeout=10) as scraper,
        ):
            began = time.monotonic()
            until = began + args.duration_s
            runner = asyncio.create_task(traffic.run(client, until))
            last = began
            while last < until and not runner.done():
                await asyncio.wait(
                    {runner}, timeout=max(0.0, min(until, last + args.sample_s) - time.monotonic())
                )
                now = time.monotonic()
                window, traffic.window = traffic.window, Window()
                try:
                    scrape = len(
                        (await scraper.get(f"http://127.0.0.1:{prometheus_port}/metrics")).content
                    )
                except httpx.HTTPError:
                    scrape = -1
                row = {
                    "t_s": round(now - began, 1),
                    "requests_per_s": round(
                        sum(window.statuses.values()) / max(now - last, 1e-9), 1
                    ),
                    "rss_kib": rss_kib(proc.pid),
                    "fds": len(os.listdir(f"/proc/{proc.pid}/fd")),
                    "wal_bytes": size(wal),
                    "db_bytes": size(db),
                    "scrape_bytes": scrape,
                    "p50_ms": round(percentile(window.latencies_ms, 0.5), 2),
                    "p99_ms": round(percentile(window.latencies_ms, 0.99), 2),
                    "non_2xx": sum(n for s, n in window.statuses.items() if s != 200),
                }
                samples.append(row)
                last = now
                print(" ".join(f"{cell(row):>{width}}" for _, width, cell in COLUMNS), flush=True)
            await runner
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
    return {"samples": samples, "traffic": traffic, "exit_code": exit_code, "db": db}


def check_stored(db: Path, acked: list[int]) -> dict[str, int | str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        stored = Counter(
            int(v)
            for (v,) in conn.execute("SELECT json_extract(metadata, '$.soak_id') FROM metrics")
        )
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return {
        "stored": sum(stored.values()),
        "lost": sum(1 for i in acked if stored[i] == 0),
        "duplicated": sum(1 for n in stored.values() if n > 1),
        "unacknowledged_stored": sum(stored.values()) - sum(1 for i in acked if stored[i]),
        "integrity": integrity,
    }


def verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Slopes and spreads over the second half of the samples (the first half is the warm-up)."""
    if len(samples) < 4:
        return {"flat": None, "reason": "too few samples for a verdict"}
    half = len(samples) // 2
    first, second = samples[:half], samples[half:]
    minutes = [s["t_s"] / 60 for s in second]
    rss_slope = slope(minutes, [s["rss_kib"] / 1024 for s in second])
    fd_first, fd_second = max(s["fds"] for s in first), max(s["fds"] for s in second)
    wal_first, wal_second = max(s["wal_bytes"] for s in first), max(s["wal_bytes"] for s in second)
    p99_first = statistics.median(s["p99_ms"] for s in first)
    p99_second = statistics.median(s["p99_ms"] for s in second)
    checks = {
        f"rss slope {rss_slope:+.3f} MiB/min <= {RSS_SLOPE_MAX_MIB_PER_MIN}": rss_slope
        <= RSS_SLOPE_MAX_MIB_PER_MIN,
        f"fds peak {fd_second} <= first half's {fd_first} + {FD_GROWTH_MAX}": fd_second
        <= fd_first + FD_GROWTH_MAX,
        f"wal peak {wal_second} B <= first half's {wal_first} B + 1 MiB": wal_second
        <= wal_first + WAL_GROWTH_MAX_BYTES,
        f"p99 median {p99_second:.1f} ms <= 2 x {p99_first:.1f} ms + 5": p99_second
        <= 2 * p99_first + 5,
    }
    return {
        "flat": all(checks.values()),
        "checks": checks,
        "rss_slope_mib_per_min": round(rss_slope, 3),
        "fds_peak": [fd_first, fd_second],
        "fds_slope_per_min": round(slope(minutes, [s["fds"] for s in second]), 3),
        "wal_max_bytes": [wal_first, wal_second],
        "p99_median_ms": [p99_first, p99_second],
        "scrape_bytes_slope_per_min": round(slope(minutes, [s["scrape_bytes"] for s in second]), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration-s", type=float, default=600.0, help="how long to send traffic (default 600)"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    parser.add_argument("--batch", type=int, default=10, help="metrics per request (default 10)")
    parser.add_argument(
        "--sample-s", type=float, default=10.0, help="sampling interval (default 10)"
    )
    parser.add_argument("--json", type=Path, help="also write the samples and the verdict here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the database and log here (default: a temp dir)"
    )
    parser.add_argument(
        "--require-flat", action="store_true", help="exit 1 if a resource was not flat"
    )
    args = parser.parse_args()
    if (
        not 0 < args.duration_s <= MAX_DURATION_S
        or not 0 < args.rate <= 10_000
        or not 1 <= args.batch <= 1000
    ):
        parser.error(
            f"--duration-s in (0, {MAX_DURATION_S}], --rate in (0, 10000], --batch in [1, 1000]"
        )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"soak: {args.duration_s:g} s at {args.rate:g} requests/s x {args.batch} metrics; workdir "
        f"{workdir}",
        flush=True,
    )
    result = asyncio.run(soak(args, workdir))
    traffic: Traffic = result["traffic"]
    stored = check_stored(result["db"], traffic.acked)
    flat = verdict(result["samples"])
    summary = {
        "requests_sent": traffic.sent,
        "requests_skipped_behind_schedule": traffic.skipped,
        "statuses": {str(k): v for k, v in sorted(traffic.statuses.items(), key=str)},
        "metrics_acknowledged": len(traffic.acked),
        **stored,
        "service_exit_code": result["exit_code"],
        "verdict": flat,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**summary, "samples": result["samples"]}, indent=2))
    ok = stored["lost"] == 0 and stored["duplicated"] == 0 and stored["integrity"] == "ok"
    ok = ok and result["exit_code"] == 0 and traffic.acked != []
    print(
        f"acknowledged {len(traffic.acked)}, lost {stored['lost']}, duplicated "
        f"{stored['duplicated']};"
        f" integrity {stored['integrity']}; flat: {flat['flat']}"
    )
    if args.require_flat and flat["flat"] is False:
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
