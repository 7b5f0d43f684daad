"""Analytics over a long history: build a database of N events over D days, time every view.

    .venv/bin/python bench/analytics.py                          # 10 million events, 30 days
    .venv/bin/python bench/analytics.py --events 100000 --days 3 # quick

The history is written with ``storage.insert_rows`` in time order, in commits of 10,000 (what
the service's group commit does under load), so the rollups are maintained as in production;
complete days are then compacted. Then each view is answered over the whole range, ``--repeat``
times on a warm connection (median and worst). Last, the cost of rollup maintenance per metric:
the same commits with and without it, for the bench workload (``_workload.py``) and for this
bench's higher-cardinality mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._workload import bodies
from metrics_service import Settings, storage
from metrics_service.analytics import queries
from metrics_service.storage import rollups, schema
from metrics_service.storage.sqlite import SyncReader
from metrics_service.storage.sqlite import rollups as sqlite_rollups
from metrics_service.validation import Validator

SERVICES = ("registry", "weather-mcp", "search-mcp", "auth-server")
TOOLS = [(SERVICES[i % 3], f"server-{i % 6}", f"tool-{i}") for i in range(40)]
CLIENTS = ("claude-desktop", "cursor", "vscode", "windsurf", "custom-agent", "zed")
TENANTS = [f"tenant-{i}" for i in range(25)]
FLOWS = ("initialize->tools/list", "tools/list->tools/call", "initialize->tools/call")


def _zipf(n: int, s: float = 1.1) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


def _row(kind: str, **values: Any) -> tuple[Any, ...]:
    """A row in the layout ``validation`` builds for ``kind`` (positions by column name, so new
    columns need no change here): the named columns, NULL elsewhere, no dimensions or metadata
    JSON."""
    positions = schema.row_positions(kind)
    row: list[Any] = [None] * len(schema.FAMILY[kind].columns)
    for name, value in values.items():
        row[positions[name]] = value
    return tuple(row)


class History:
    """Rows in the layout ``validation`` builds, drawn from skewed (Zipf) distributions."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.tool_w, self.client_w, self.tenant_w = (
            _zipf(len(TOOLS)),
            _zipf(len(CLIENTS)),
            _zipf(len(TENANTS)),
        )
        self.tool_mu = [self.rng.uniform(2.0, 5.5) for _ in TOOLS]

    def rows(self, start_ms: int, end_ms: int, n: int) -> dict[str, list[tuple[Any, ...]]]:
        rng = self.rng
        ts = sorted(rng.randrange(start_ms, end_ms) for _ in range(n))
        kinds = rng.choices(range(4), weights=(60, 20, 10, 10), k=n)
        tools = rng.choices(range(len(TOOLS)), weights=self.tool_w, k=n)
        clients = rng.choices(CLIENTS, weights=self.client_w, k=n)
        tenants = rng.choices(range(len(TENANTS)), weights=self.tenant_w, k=n)
        out: dict[str, list[tuple[Any, ...]]] = {
            "tool_execution": [],
            "auth_request": [],
            "tool_discovery": [],
            "protocol_latency": [],
        }
        for i in range(n):
            t, k = ts[i], kinds[i]
            common = {"ts": t, "received_at": t, "service_version": "1.0.0", "value": 1.0}
            if k == 0:
                service, server, tool = TOOLS[tools[i]]
                ok = rng.random() < 0.97
                tenant = tenants[i]
                out["tool_execution"].append(
                    _row(
                        "tool_execution",
                        **common,
                        service=service,
                        duration_ms=rng.lognormvariate(self.tool_mu[tools[i]], 0.8),
                        method="tools/call",
                        tool_name=tool,
                        server_name=server,
                        client_name=clients[i],
                        client_version="1.0",
                        success=int(ok),
                        input_size_bytes=200,
                        output_size_bytes=4000,
                        transport="stdio",
                        agent_id=f"agent-{tenant}-{i % 3}",
                        tenant_id=TENANTS[tenant],
                        input_tokens=rng.randrange(50, 2000),
                        output_tokens=rng.randrange(100, 8000),
                    )
                )
            elif k == 1:
                out["auth_request"].append(
                    _row(
                        "auth_request",
                        **common,
                        service="auth-server",
                        duration_ms=rng.lognormvariate(2.0, 0.6),
                        success=int(rng.random() < 0.95),
                        method=rng.choice(("jwt", "oauth", "jwt", "jwt")),
                        server="auth-1",
                        user_hash=f"user-{int(rng.paretovariate(1.2)) % 5000}",
                    )
                )
            elif k == 2:
                emb, search = rng.lognormvariate(2.5, 0.5), rng.lognormvariate(1.5, 0.5)
                out["tool_discovery"].append(
                    _row(
                        "tool_discovery",
                        **common,
                        service="registry",
                        duration_ms=emb + search + 1,
                        results_count=rng.randrange(0, 10),
                        top_k=10,
                        top_n=3,
                        embedding_time_ms=emb,
                        search_time_ms=search,
                    )
                )
            else:
                out["protocol_latency"].append(
                    _row(
                        "protocol_latency",
                        **common,
                        service=TOOLS[tools[i]][0],
                        duration_ms=rng.lognormvariate(4.5, 1.0),
                        flow_step=FLOWS[i % 3],
                        server_name=TOOLS[tools[i]][1],
                        client_name=clients[i],
                    )
                )
        return out


def build(path: Path, events: int, days: int, commit_rows: int = 10_000) -> dict[str, float]:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn, _ = storage.open_database(path, synchronous="normal")
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - days * rollups.DAY_MS
    # As a service that has run all along: days are compacted after the fact, not as late events.
    conn.execute(
        "UPDATE rollup_watermark SET until_ms = ?", (start_ms // rollups.DAY_MS * rollups.DAY_MS,)
    )
    history = History()
    started = time.perf_counter()
    step = (now_ms - start_ms) * commit_rows // events
    t, done = start_ms, 0
    while done < events:
        n = min(commit_rows, events - done)
        storage.insert_rows(conn, [history.rows(t, min(now_ms, t + step), n)])
        t += step
        done += n
        if done % 1_000_000 < commit_rows:
            print(f"  {done:,} events", file=sys.stderr, flush=True)
    insert_s = time.perf_counter() - started
    started = time.perf_counter()
    sqlite_rollups.compact(conn, now_ms)
    compact_s = time.perf_counter() - started
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"insert_s": insert_s, "compact_s": compact_s, "bytes": path.stat().st_size}


CASES: list[tuple[str, dict[str, str]]] = [
    ("summary", {}),
    ("tools", {}),
    ("clients", {}),
    ("clients", {"by": "agent"}),
    ("services", {"by": "server"}),
    ("tenants", {}),
    ("tenants", {"by": "tool", "limit": "1000"}),
    ("users", {}),
    ("auth", {}),
    ("discovery", {}),
    ("protocol", {}),
    ("timeseries", {"resolution": "hour"}),
    ("timeseries", {"resolution": "day"}),
    ("summary", {"service": "weather-mcp"}),
    ("tools", {"tenant": "tenant-3"}),
    ("timeseries", {"resolution": "minute", "since": "24h"}),
    ("tools", {"client": "cursor"}),  # the tool-and-client cube (migration 4); raw rows before it
]


def time_views(path: Path, days: int, repeat: int) -> list[dict[str, Any]]:
    conn = storage.connect(path)
    results = []
    for view, extra in CASES:
        query = {"since": f"{days}d", **extra}
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            conn.execute("BEGIN")  # one snapshot, as the service reads a view
            body = asyncio.run(queries.run(SyncReader(conn), view, query))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
        results.append(
            {
                "case": f"/analytics/{view}"
                + ("?" + "&".join(f"{k}={v}" for k, v in extra.items()) if extra else ""),
                "median_ms": statistics.median(times) * 1000,
                "max_ms": max(times) * 1000,
                "source": body["source"],
            }
        )
    conn.close()
    return results


def maintenance_cost(tmp: Path, metrics: int) -> list[dict[str, Any]]:
    """µs per metric that rollup maintenance adds to a commit, by workload and commit size."""
    validator = Validator(Settings(db_path=tmp))
    history = History(seed=2)
    now_ms = int(time.time() * 1000)
    out = []
    for batch in (100, 1000, 10_000):
        n = max(batch * 5, metrics)
        workloads = {
            "bench workload (_workload.py)": [
                validator.decode(b).rows for b in bodies(n // min(batch, 1000), min(batch, 1000))
            ],
            "this bench's mix (Zipf, 40 tools, 25 tenants, 5000 users)": [
                history.rows(now_ms - 600_000 + i, now_ms + i, min(batch, 1000))
                for i in range(n // min(batch, 1000))
            ],
        }
        for name, parts in workloads.items():
            commits = [
                parts[i : i + max(1, batch // 1000)]
                for i in range(0, len(parts), max(1, batch // 1000))
            ]
            cost = {}
            for mode in ("without", "with"):
                path = tmp / f"cost-{mode}.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                conn, _ = storage.open_database(path, synchronous="normal")
                original = sqlite_rollups.catch_up
                if mode == "without":
                    sqlite_rollups.catch_up = lambda conn, pending=None: 0  # type: ignore[assignment]
                try:
                    storage.insert_rows(conn, commits[0])  # warm up
                    started = time.perf_counter()
                    total = 0
                    for commit in commits[1:]:
                        total += storage.insert_rows(conn, commit)
                    cost[mode] = (time.perf_counter() - started) / total * 1e6
                finally:
                    sqlite_rollups.catch_up = original  # type: ignore[assignment]
                    conn.close()
            out.append(
                {
                    "workload": name,
                    "commit_rows": batch,
                    "insert_us": cost["without"],
                    "with_rollups_us": cost["with"],
                    "rollups_us": cost["with"] - cost["without"],
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--db", type=Path, default=Path("/tmp/metrics-analytics-bench.db"))
    parser.add_argument("--reuse", action="store_true", help="time the views on an existing --db")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--maintenance-metrics", type=int, default=50_000, help="metrics per maintenance cost run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {"events": args.events, "days": args.days}
    if not args.reuse:
        print(
            f"building {args.events:,} events over {args.days} days in {args.db} ...",
            file=sys.stderr,
        )
        report["build"] = build(args.db, args.events, args.days)
    report["views"] = time_views(args.db, args.days, args.repeat)
    report["maintenance"] = maintenance_cost(args.db.parent, args.maintenance_metrics)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    if "build" in report:
        b = report["build"]
        print(
            f"built in {b['insert_s']:.0f} s ({b['insert_s'] / args.events * 1e6:.1f} µs/event "
            "incl. rollups), "
            f"compaction {b['compact_s']:.1f} s, {b['bytes'] / 2**30:.2f} GiB"
        )
    print(
        f"\n| view, {args.days} days over {args.events:,} events | median ms | max ms | source |"
        "\n|---|---|---|---|"
    )
    for v in report["views"]:
        print(f"| `{v['case']}` | {v['median_ms']:.0f} | {v['max_ms']:.0f} | {v['source']} |")
    print(
        "\n| workload | commit rows | insert µs/metric | with rollups | rollups µs/metric |"
        "\n|---|---|---|---|---|"
    )
    for m in report["maintenance"]:
        print(
            f"| {m['workload']} | {m['commit_rows']:,} | {m['insert_us']:.1f} | "
            f"{m['with_rollups_us']:.1f} | {m['rollups_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
