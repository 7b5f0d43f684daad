"""Ingest throughput and latency of ``POST /metrics``, side by side with a bare pydantic baseline.

    .venv/bin/python bench/ingest.py                       # the full matrix (about 6 minutes)
    .venv/bin/python bench/ingest.py --batch 100 --concurrency 16 --runs 3 --duration 8
    .venv/bin/python bench/ingest.py --prefill 10000000    # the same against a 10M-row database
    .venv/bin/python bench/ingest.py --expired 2000000     # while retention deletes 2M old rows
    .venv/bin/python bench/ingest.py --targets service --batch 100 --concurrency 16 --runs 1 \
        --duration 600 --sample-every 10                  # memory over a 10-minute run

For each batch size and concurrency, and for each of ``--runs`` rounds, the two baselines
(``bench/baseline_app.py``: FastAPI parsing with the service's pydantic models, and ``lean``:
with the reference metrics-service's simpler models; neither stores anything) and the
service (default settings: durable acknowledgement, SQLite on a fresh temporary file) each run in
a fresh process pinned to ``--server-cpu`` while this process, pinned to ``--client-cpu``, drives
it over keep-alive HTTP/1.1 connections for ``--duration`` seconds. Reported per run: requests/s,
metrics/s accepted, latency p50/p95/p99, responses by status, server CPU (share of one core) and
peak RSS (VmHWM); for the service the rows in the database are counted after shutdown and compared
with the metrics acknowledged (2xx). The table gives medians over the runs and the service's
ratio of those medians to each baseline.

``--prefill N`` copies a database already holding N events (7 days of history, built once with
``bench/analytics.py``'s generator, rollups included) under every service run; ``--expired N``
does the same with N events older than the retention period, so that the service's retention
deletes them (in chunks, on the writer thread) while the load runs; ``--sample-every S`` records
the server's RSS, open files and WAL size every S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import bodies, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-ingest-key-0123456789abcdefghijklmnop"
TABLES = (
    "auth_metrics",
    "tool_metrics",
    "discovery_metrics",
    "protocol_latency_metrics",
    "custom_metrics",
)


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


@dataclass
class Server:
    """A server process (the service or the baseline) on a free loopback port."""

    kind: str
    cpu: int | None
    db_path: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    program: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "metrics_service", "serve"]
    )

    def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("METRICS_", "SQLITE_", "OTEL_"))
        }
        if self.kind == "service":
            assert self.db_path is not None
            env.update(
                {
                    "SQLITE_DB_PATH": str(self.db_path),
                    "METRICS_SERVICE_PORT": str(self.port),
                    "METRICS_API_KEY_SVC": KEY,
                    "METRICS_RATE_LIMIT": "100000000",
                    "METRICS_LOG_LEVEL": "WARNING",
                    "OTEL_PROMETHEUS_PORT": "0",
                    **self.extra_env,
                }
            )
            cmd = self.program
        else:
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "baseline_app:lean" if self.kind == "lean" else "baseline_app:app",
                "--app-dir",
                "bench",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ]
        self.proc = subprocess.Popen(pinned(cmd, self.cpu), cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not start") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


# -- the load generator: keep-alive HTTP/1.1 connections on asyncio, parsed by hand ----------


def sample(server: Server, db_path: Path | None) -> dict[str, float]:
    """RSS (MB), open file descriptors and WAL size (MB) of the server now."""
    rss = 0.0
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    wal = Path(f"{db_path}-wal") if db_path else None
    return {
        "rss_mb": rss,
        "fds": len(os.listdir(f"/proc/{server.pid}/fd")),
        "wal_mb": wal.stat().st_size / 2**20 if wal and wal.exists() else 0.0,
    }


async def sampler(
    server: Server, db_path: Path | None, every_s: float, out: list[dict[str, float]]
) -> None:
    while True:
        out.append({"at": time.perf_counter(), **sample(server, db_path)})
        await asyncio.sleep(every_s)


def windows(samples: list[dict[str, float]], loads: tuple[Load, Load]) -> list[dict[str, float]]:
    """The samples, each with the p99 latency of the responses since the previous one."""
    done = [
        (t, ms) for load in loads for t, ms in zip(load.finished_at, load.latencies_ms, strict=True)
    ]
    out = []
    for before, this in zip([{"at": 0.0}, *samples], samples, strict=False):
        window = [ms for t, ms in done if before["at"] < t <= this["at"]]
        row = {k: round(v, 2) for k, v in this.items() if k != "at"}
        out.append(
            {
                "t_s": round(this["at"] - samples[0]["at"], 1),
                **row,
                "p99_ms": round(percentile(window, 0.99), 1),
                "responses": len(window),
            }
        )
    return out


@dataclass
class Load:
    requests: int = 0
    accepted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)  # perf_counter() of each response
    errors: int = 0
    elapsed_s: float = 0.0


async def _connection(
    port: int, requests: list[bytes], stop_at: float, load: Load, offset: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = len(requests)
    i = offset
    perf = time.perf_counter
    try:
        while perf() < stop_at:
            started = perf()
            writer.write(requests[i % n])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            done = perf()
            load.latencies_ms.append((done - started) * 1000)
            load.finished_at.append(done)
            load.requests += 1
            load.statuses[status] += 1
            if 200 <= status < 300:
                load.accepted += json.loads(body)["accepted"]
    except (OSError, asyncio.IncompleteReadError):
        load.errors += 1
    finally:
        writer.close()


async def drive(
    port: int,
    payloads: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    sample_on: tuple[Server, Path | None, float, list[dict[str, float]]] | None = None,
) -> tuple[Load, Load]:
    """Warm up for ``warmup_s``, then measure for ``duration_s``; the loads of both phases."""
    requests = [
        b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-API-Key: "
        + KEY.encode()
        + b"\r\nContent-Length: "
        + str(len(p)).encode()
        + b"\r\n\r\n"
        + p
        for p in payloads
    ]
    loads = []
    sampling = asyncio.create_task(sampler(*sample_on)) if sample_on else None
    for seconds in (warmup_s, duration_s):
        load = Load()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _connection(port, requests, started + seconds, load, c * 7)
                for c in range(concurrency)
            )
        )
        load.elapsed_s = time.perf_counter() - started
        loads.append(load)
    if sampling is not None:
        sampling.cancel()
    return loads[0], loads[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def expired_rows(db_path: Path) -> int:
    """Rows older than 30 days (what ``--expired`` put there for retention to delete)."""
    conn = sqlite3.connect(db_path)
    cutoff = int((time.time() - 30 * 86_400) * 1000)
    try:
        return sum(
            conn.execute(f"SELECT count(*) FROM {t} WHERE ts < ?", (cutoff,)).fetchone()[0]
            for t in TABLES
        )
    finally:
        conn.close()


def stored_rows(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
    finally:
        conn.close()


def run_one(
    kind: str, args: argparse.Namespace, batch: int, concurrency: int, prefilled: Path | None
) -> dict[str, Any]:
    """One run of one target on a fresh database (a copy of ``prefilled`` for the service)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    db_path = workdir / "metrics.db"
    if prefilled is not None and kind == "service":
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{prefilled}{suffix}").exists():
                shutil.copyfile(f"{prefilled}{suffix}", f"{db_path}{suffix}")
    rows_before = stored_rows(db_path) if db_path.exists() else 0
    extra_env = (
        {"METRICS_RETENTION_DAYS": "30"} if args.expired else {"METRICS_RETENTION_DAYS": "365"}
    )
    server = Server(kind, args.server_cpu, db_path=db_path, extra_env=extra_env)
    samples: list[dict[str, float]] = []
    try:
        server.start()
        payloads = bodies(max(8, 2000 // batch), batch)
        cpu_before = server.cpu_seconds()
        sample_on = (
            (server, db_path if kind == "service" else None, args.sample_every, samples)
            if args.sample_every
            else None
        )
        warm, load = asyncio.run(
            drive(server.port, payloads, concurrency, args.duration, args.warmup, sample_on)
        )
        cpu_after = server.cpu_seconds()
        peak = server.peak_rss_mb()
    finally:
        code = server.stop()
    result: dict[str, Any] = {
        "kind": kind,
        "batch": batch,
        "concurrency": concurrency,
        "requests_per_s": load.requests / load.elapsed_s,
        "metrics_per_s": load.accepted / load.elapsed_s,
        "p50_ms": percentile(load.latencies_ms, 0.50),
        "p95_ms": percentile(load.latencies_ms, 0.95),
        "p99_ms": percentile(load.latencies_ms, 0.99),
        "statuses": dict(load.statuses),
        "connection_errors": load.errors,
        "samples": windows(samples, (warm, load)),
        "server_cpu": (cpu_after - cpu_before) / (warm.elapsed_s + load.elapsed_s),
        "cpu_us_per_request": (cpu_after - cpu_before)
        / max(1, warm.requests + load.requests)
        * 1e6,
        "peak_rss_mb": peak,
        "exit_code": code,
    }
    if kind == "service":
        # Everything acknowledged, warm-up included, must be stored, and nothing else.
        stored = (
            stored_rows(db_path)
            - rows_before
            + (args.expired - expired_rows(db_path) if args.expired else 0)
        )
        acknowledged = warm.accepted + load.accepted
        result["stored"] = stored
        result["acknowledged"] = acknowledged
        result["missing"] = max(0, acknowledged - stored)
        result["unexpected"] = max(0, stored - acknowledged)
        if args.expired:
            result["expired_left"] = expired_rows(db_path)
        result["bytes_per_metric"] = _bytes_per_metric(db_path, stored + rows_before)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def _bytes_per_metric(db_path: Path, rows: int) -> float:
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return db_path.stat().st_size / rows if rows else float("nan")


def build_history(path: Path, events: int, expired: int) -> None:
    """``events`` over the last 7 days and ``expired`` 40 to 33 days old, with their rollups."""
    sys.path.insert(0, str(ROOT))
    from bench.analytics import History
    from metrics_service import storage

    conn, _ = storage.open_database(path, synchronous="normal")
    history = History()
    now_ms = int(time.time() * 1000)
    day = 86_400_000
    started = time.perf_counter()
    for count, start_ms, end_ms in (
        (expired, now_ms - 40 * day, now_ms - 33 * day),
        (events, now_ms - 7 * day, now_ms - 60_000),
    ):
        step = (end_ms - start_ms) * 10_000 // max(1, count)
        done, t = 0, start_ms
        while done < count:
            n = min(10_000, count - done)
            storage.insert_rows(conn, [history.rows(t, min(end_ms, t + step), n)])
            done, t = done + n, t + step
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(
        f"history of {events:,} + {expired:,} expired events built in "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )


def median(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", default="1,100", help="comma-separated batch sizes")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated connection counts"
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of unmeasured load first"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--targets",
        default="baseline,lean,service",
        help="baseline (our pydantic models), lean (the reference's models), service",
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--prefill", type=int, default=0, help="rows already in the service's database"
    )
    parser.add_argument(
        "--expired", type=int, default=0, help="rows past retention, deleted during the run"
    )
    parser.add_argument(
        "--sample-every", type=float, default=0, help="seconds between RSS/fd/WAL samples"
    )
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    if args.client_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    prefilled = None
    if args.prefill or args.expired:
        prefilled = Path(tempfile.mkdtemp(prefix="bench-prefill-")) / "metrics.db"
        build_history(prefilled, args.prefill, args.expired)
    targets = args.targets.split(",")
    all_runs: list[dict[str, Any]] = []
    table = []
    for batch in (int(b) for b in args.batch.split(",")):
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            for _ in range(args.runs):
                for kind in targets:
                    result = run_one(kind, args, batch, concurrency, prefilled)
                    runs[kind].append(result)
                    all_runs.append(result)
                    print(json.dumps(result), file=sys.stderr, flush=True)
            table.append(summarise(batch, concurrency, runs))
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps({"runs": all_runs, "summary": table}, indent=1))
    if prefilled is not None:
        shutil.rmtree(prefilled.parent, ignore_errors=True)
    missing = sum(r.get("missing", 0) + r.get("unexpected", 0) for r in all_runs)
    if missing:
        print(
            f"MISMATCH: {missing} metrics acknowledged but not stored, or stored but not "
            "acknowledged",
            file=sys.stderr,
        )
        sys.exit(1)


def summarise(
    batch: int, concurrency: int, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    row: dict[str, Any] = {"batch": batch, "concurrency": concurrency}
    for kind, results in runs.items():
        for key in (
            "requests_per_s",
            "metrics_per_s",
            "p50_ms",
            "p99_ms",
            "server_cpu",
            "peak_rss_mb",
        ):
            row[f"{kind}_{key}"] = median(results, key)
        if kind == "service":
            row["service_missing"] = sum(r["missing"] for r in results)
            row["service_non_2xx"] = sum(
                n for r in results for s, n in r["statuses"].items() if not 200 <= s < 300
            )
            row["service_bytes_per_metric"] = median(results, "bytes_per_metric")
    if "service" in runs:
        for base, name in (("baseline", "ratio"), ("lean", "lean_ratio")):
            if base in runs:
                row[name] = row["service_metrics_per_s"] / row[f"{base}_metrics_per_s"]
                row[f"{name}_requests"] = (
                    row["service_requests_per_s"] / row[f"{base}_requests_per_s"]
                )
                row[f"{name}_p99"] = row["service_p99_ms"] / row[f"{base}_p99_ms"]
    return row


def print_table(table: list[dict[str, Any]]) -> None:
    header = (
        f"{'batch':>5} {'conc':>4} | {'base req/s':>10} {'base m/s':>9} {'b p99':>6} | "
        f"{'svc req/s':>9} {'svc m/s':>9} {'p50':>6} {'p99':>6} {'cpu':>4} {'rss MB':>6} "
        f"{'lost':>4} | {'ratio':>5} | {'lean m/s':>9} {'l p99':>6} {'lean':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in table:

        def g(key: str, fmt: str, row: dict[str, Any] = row) -> str:
            return format(row[key], fmt) if key in row else "-"

        print(
            f"{row['batch']:>5} {row['concurrency']:>4} | "
            f"{g('baseline_requests_per_s', '>10,.0f')} "
            f"{g('baseline_metrics_per_s', '>9,.0f')} {g('baseline_p99_ms', '>6.1f')} | "
            f"{g('service_requests_per_s', '>9,.0f')} {g('service_metrics_per_s', '>9,.0f')} "
            f"{g('service_p50_ms', '>6.1f')} {g('service_p99_ms', '>6.1f')} "
            f"{g('service_server_cpu', '>4.2f')} "
            f"{g('service_peak_rss_mb', '>6.0f')} {g('service_missing', '>4')} | "
            f"{g('ratio', '>5.2f')} | "
            f"{g('lean_metrics_per_s', '>9,.0f')} {g('lean_p99_ms', '>6.1f')} "
            f"{g('lean_ratio', '>5.2f')}"
        )


if __name__ == "__main__":
    main()
