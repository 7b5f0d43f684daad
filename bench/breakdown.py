"""Where the service's CPU goes per ingested metric, measured inside the real server under load.

    .venv/bin/python bench/breakdown.py [--batch 100] [--concurrency 16] [--duration 10]

Starts ``metrics-service serve`` (default settings, fresh temporary database) in a child
process pinned to ``--server-cpu``, with thread-CPU timers around the stages of the ingest path:
validation (``Validator.decode``), the OpenTelemetry recording (``Telemetry.on_commit``), the
insert of the raw rows and the rollup maintenance (both on the SQLite backend's writer thread,
inside ``storage/sqlite/database.insert_rows``). Everything else (HTTP, auth, rate limiting, the
write queue, the event loop, garbage collection) is the process's CPU time minus those. Drives
it like ``ingest.py`` and prints microseconds of CPU per metric for each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import ROOT, Server, bodies, drive


def _child(report: Path) -> None:
    """The server, with timers; writes the totals to ``report`` on SIGUSR1 and exits."""
    from metrics_service import telemetry, validation
    from metrics_service.cli import main
    from metrics_service.storage.sqlite import database, rollups

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.thread_time() - started
                calls[label] = calls.get(label, 0) + 1

        setattr(owner, name, wrapper)

    timed(validation.Validator, "decode", "validation")
    timed(telemetry.Telemetry, "on_commit", "opentelemetry")
    timed(telemetry.Telemetry, "snapshot", "opentelemetry")
    # The SQLite backend calls both through their modules' attributes.
    timed(database, "insert_rows", "storage")
    timed(rollups, "catch_up", "rollups")
    collecting: dict[str, float] = {}

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting["since"] = time.thread_time()
        elif "since" in collecting:
            key = f"garbage collection, generation {info['generation']}"
            spent[key] = spent.get(key, 0.0) + time.thread_time() - collecting.pop("since")

    gc.callbacks.append(gc_timer)
    started = time.process_time()

    def dump(*_: Any) -> None:
        commits = {"commits": calls.get("storage", 0)}
        report.write_text(
            json.dumps({"process": time.process_time() - started, **spent, **commits})
        )
        os._exit(0)

    signal.signal(signal.SIGUSR1, dump)
    main(["serve"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    workdir = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    report = workdir / "report.json"
    server = Server(
        "service",
        args.server_cpu,
        db_path=workdir / "metrics.db",
        extra_env={"PYTHONPATH": str(ROOT)},
        program=[sys.executable, str(Path(__file__).resolve()), "--child", str(report)],
    )
    server.start()
    warm, load = asyncio.run(
        drive(
            server.port,
            bodies(max(8, 2000 // args.batch), args.batch),
            args.concurrency,
            args.duration,
            1.0,
        )
    )
    server.proc.send_signal(signal.SIGUSR1)
    server.proc.wait(timeout=30)
    spent = json.loads(report.read_text())
    commits = spent.pop("commits")
    shutil.rmtree(workdir, ignore_errors=True)
    metrics = warm.accepted + load.accepted
    collections = {k: v for k, v in spent.items() if k.startswith("garbage")}
    stages = {k: v for k, v in spent.items() if k != "process" and k not in collections}
    stages["storage"] -= stages.get("rollups", 0.0)
    stages["other (HTTP, auth, limits, queue, loop, GC)"] = spent["process"] - sum(stages.values())
    total = spent["process"]
    print(
        f"batch {args.batch}, concurrency {args.concurrency}: "
        f"{load.requests / load.elapsed_s:,.0f} req/s, "
        f"{load.accepted / load.elapsed_s:,.0f} metrics/s; CPU per metric (the server's start-up "
        "included)"
    )
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {name:45s} {seconds / metrics * 1e6:7.2f} us  {seconds / total:6.1%}")
    print(f"  {'total':45s} {total / metrics * 1e6:7.2f} us")
    print(f"commits: {commits:,}, {metrics / max(1, commits):,.0f} metrics per commit")
    print("of which (inside the stages above, wherever a collection was triggered):")
    for name, seconds in sorted(collections.items()):
        print(f"  {name:45s} {seconds / metrics * 1e6:7.2f} us  {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
