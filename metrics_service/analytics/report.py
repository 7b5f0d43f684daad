"""``metrics-service report``: the summary and the top tools, clients and failing tools, read
straight from the database file (no service needed)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from metrics_service.analytics import queries
from metrics_service.analytics.routes import to_csv
from metrics_service.storage.backend import Reader, StorageBackend


def add_parser(sub: Any) -> None:
    report = sub.add_parser("report", help="usage summary, top tools, clients and errors")
    report.add_argument(
        "--since", default="24h", help="ISO time, unix seconds or a duration before now (24h, 7d)"
    )
    report.add_argument("--until", default="now")
    report.add_argument("--service", help="only this service")
    report.add_argument("--limit", default="10", help="rows per table (default 10)")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")


async def build(storage: StorageBackend, args: argparse.Namespace) -> dict[str, Any]:
    """Raises ``InvalidPayload`` (field and rule) for a bad argument."""
    # Relative times count back from one instant, the same for every table.
    query = {
        "since": args.since,
        "until": f"{time.time():.3f}" if args.until == "now" else args.until,
    }
    if args.service:
        query["service"] = args.service
    top = {**query, "limit": args.limit}

    async def views(reader: Reader) -> dict[str, Any]:
        errors = (await queries.run(reader, "tools", {**top, "sort": "errors"}))["rows"]
        return {
            "summary": await queries.run(reader, "summary", query),
            "tools": (await queries.run(reader, "tools", top))["rows"],
            "clients": (await queries.run(reader, "clients", top))["rows"],
            "errors": [r for r in errors if r["errors"]],
        }

    # One snapshot for the whole report.
    return await storage.analytics(views)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"{title}\n  (none)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _tool_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["tool"],
            r["server"] or "-",
            f"{r['calls']:,}",
            f"{r['errors']:,}",
            _rate(r["error_rate"]),
            _ms(r["latency_ms"]["p50"]),
            _ms(r["latency_ms"]["p95"]),
            _ms(r["latency_ms"]["p99"]),
        ]
        for r in rows
    ]


def as_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    lat = s["latency_ms"]
    filters = ", ".join(f"{k}={v}" for k, v in s["filters"].items()) or "all services"
    auth = s["auth"]
    lines = [
        f"MCP usage {s['since']} .. {s['until']} ({filters})",
        "",
        f"  calls             {s['calls']:,}",
        f"  errors            {s['errors']:,} ({_rate(s['error_rate'])})",
        f"  latency ms        p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])} "
        f" max {_ms(lat['max'])}",
        f"  tokens            {s['input_tokens']:,} in, {s['output_tokens']:,} out",
        f"  distinct clients  {s['distinct_clients']:,}",
        "  distinct users    "
        f"{'-' if s['distinct_users'] is None else format(s['distinct_users'], ',')}",
    ]
    if auth is not None:
        lines.append(
            f"  authentications   {auth['requests']:,} ({_rate(auth['success_rate'])} succeeded)"
        )
    tool_header = ["TOOL", "SERVER", "CALLS", "ERRORS", "ERROR %", "P50 MS", "P95 MS", "P99 MS"]
    client_rows = [
        [
            r["client"] or "(none)",
            f"{r['calls']:,}",
            f"{r['errors']:,}",
            _rate(r["error_rate"]),
            _ms(r["latency_ms"]["p95"]),
        ]
        for r in report["clients"]
    ]
    return "\n\n".join(
        [
            "\n".join(lines),
            _table("Top tools", tool_header, _tool_rows(report["tools"])),
            _table("Top clients", ["CLIENT", "CALLS", "ERRORS", "ERROR %", "P95 MS"], client_rows),
            _table("Most errors", tool_header, _tool_rows(report["errors"])),
        ]
    )


def as_csv(report: dict[str, Any]) -> str:
    """One CSV: a ``section`` column (summary, tool, client, error) and the flattened fields."""
    s = {k: v for k, v in report["summary"].items() if k not in ("filters", "source")}
    rows = [{"section": "summary", **s}]
    rows += [{"section": "tool", **r} for r in report["tools"]]
    rows += [{"section": "client", **r} for r in report["clients"]]
    rows += [{"section": "error", **r} for r in report["errors"]]
    return to_csv(rows)


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":
        return as_csv(report)
    return as_table(report)
