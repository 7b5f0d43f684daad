"""The ``metrics-service`` command.

    metrics-service serve [--host H] [--port P] [--first-run-key SERVICE]
    metrics-service keys create --service NAME [--alias NAME]... [--rate-limit N]
                                [--role ingest|admin|viewer]
    metrics-service keys list [--all] [--json]
    metrics-service keys revoke ID
    metrics-service keys rotate ID
    metrics-service retention run [--dry-run]
    metrics-service db stats [--json]
    metrics-service db drop-reference
    metrics-service db reference-sql on|off|status
    metrics-service report [--since 24h] [--until T] [--service X] [--limit N]
                           [--format table|json|csv]

Settings come from the environment (see the README); the CLI and a running service share the
database: a key created here works on its first request to a running service (an unknown key
makes it reload its keys), and a revoked key is refused within METRICS_KEY_RELOAD_INTERVAL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from metrics_service import auth
from metrics_service.analytics import report
from metrics_service.errors import ConfigError, InvalidPayload, StorageError
from metrics_service.settings import Settings, env_api_keys, load_settings
from metrics_service.storage.backend import KeyRecord, StorageBackend, create_backend

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metrics-service", description="MCP metrics collection service"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (METRICS_SERVICE_HOST)")
    serve.add_argument("--port", type=int, help="port (METRICS_SERVICE_PORT)")
    serve.add_argument(
        "--first-run-key",
        metavar="SERVICE",
        help="if the database has no key at all, create an ingest key for SERVICE and print it "
        "once",
    )

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--service", help="the service this ingest key reports for")
    create.add_argument(
        "--rate-limit", type=int, help="requests per minute (default METRICS_RATE_LIMIT)"
    )
    create.add_argument("--role", choices=auth.ROLES, default="ingest")
    create.add_argument("--description")
    create.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="a further service name this ingest key may report as (repeatable)",
    )
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true")
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", type=int)
    rotate = keys.add_parser(
        "rotate",
        help="replace a key by a new one (same service, role, aliases, rate limit) and revoke it",
    )
    rotate.add_argument("id", type=int)

    retention = sub.add_parser("retention", help="data retention").add_subparsers(
        dest="retention_command", required=True
    )
    run = retention.add_parser("run", help="delete metrics older than each table's policy")
    run.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db_stats = db.add_parser("stats", help="rows per table, file and WAL size")
    db_stats.add_argument("--json", action="store_true")
    db.add_parser(
        "drop-reference",
        help="drop the reference_* tables left by adopting an MCP Gateway Registry database",
    )
    copy = db.add_parser(
        "copy-to-postgres",
        help="copy the SQLite database at SQLITE_DB_PATH (its metrics, rollups, keys and "
        "policies) into an empty PostgreSQL database",
    )
    copy.add_argument(
        "--to",
        metavar="URL",
        help="postgresql://user:password@host:5432/db (default: METRICS_DATABASE_URL)",
    )
    sql = db.add_parser(
        "reference-sql",
        help="the text timestamp column the MCP Gateway Registry's documented SQL reads "
        "(about 0.8 us per stored metric)",
    )
    sql.add_argument("state", choices=("on", "off", "status"))
    report.add_parser(sub)
    return parser


def _with_storage(settings: Settings, fn: Callable[[StorageBackend], Awaitable[T]]) -> T:
    """Open the database (migrating it, finishing a pending import) and run ``fn`` on it."""

    async def run() -> T:
        storage = create_backend(settings)
        try:
            await storage.open()
            return await fn(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _created(record: KeyRecord, secret: str, verb: str = "Created") -> None:
    also = f", also as {', '.join(record.aliases)}" if record.aliases else ""
    print(
        f"{verb} key {record.id} "
        f"({record.role}{', service ' + record.service if record.service else ''}{also})."
    )
    print("It is shown only this once; only its hash is stored:\n")
    print(f"    {secret}\n")


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    if args.keys_command == "create" and args.role == "ingest" and not args.service:
        print("error: an ingest key needs --service NAME", file=sys.stderr)
        return 2
    return _with_storage(settings, lambda storage: _keys_command(args, settings, storage))


async def _keys_command(
    args: argparse.Namespace, settings: Settings, storage: StorageBackend
) -> int:
    if args.keys_command == "create":
        try:
            secret, record = await auth.create_key(
                storage,
                service=args.service,
                role=args.role,
                rate_limit_per_min=args.rate_limit,
                source="cli",
                description=args.description,
                aliases=tuple(args.alias),
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _created(record, secret)
        return 0
    if args.keys_command == "list":
        records = await storage.list_keys(active_only=not args.all)
        if args.json:
            print(json.dumps([r.public() for r in records], indent=2))
            return 0
        rows = [["ID", "ROLE", "SERVICE", "PREFIX", "RATE/MIN", "SOURCE", "CREATED", "REVOKED"]]
        rows += [
            [
                str(r.id),
                r.role,
                (r.service or "-") + (f" (+{','.join(r.aliases)})" if r.aliases else ""),
                r.key_prefix + "…",
                str(r.rate_limit_per_min or f"{settings.rate_limit_per_min} (default)"),
                r.source,
                _time(r.created_at),
                _time(r.revoked_at),
            ]
            for r in records
        ]
        print(_table(rows))
        return 0
    if args.keys_command == "rotate":
        rotated = await auth.rotate_key(storage, args.id, source="cli")
        if rotated is None:
            print(f"error: no active key with id {args.id}", file=sys.stderr)
            return 1
        secret, old, new = rotated
        _created(new, secret, f"Key {old.id} revoked and replaced by")
        print(
            f"A running service refuses key {old.id} within {settings.key_reload_interval_s:g} s."
        )
        return 0
    revoked = await storage.revoke_key(args.id)
    if revoked is None:
        print(f"error: no key with id {args.id}", file=sys.stderr)
        return 1
    print(
        f"Key {revoked.id} revoked; a running service refuses it within "
        f"{settings.key_reload_interval_s:g} s."
    )
    return 0


async def _retention(settings: Settings, dry_run: bool) -> list[dict[str, Any]]:
    from metrics_service.retention import run_once

    storage = create_backend(settings)
    try:
        await storage.open()
        return [r.as_dict() for r in await run_once(storage, settings, dry_run=dry_run)]
    finally:
        await storage.close()


def _report(args: argparse.Namespace, settings: Settings) -> int:
    try:
        text = report.render(
            _with_storage(settings, lambda storage: report.build(storage, args)), args.format
        )
    except InvalidPayload as exc:
        for d in exc.details:
            print(f"error: --{d['field']}: {d['message']} ({d['rule']})", file=sys.stderr)
        return 2
    print(text, end="" if args.format == "csv" else "\n")
    return 0


def _drop_reference(settings: Settings) -> int:
    try:
        dropped = _with_storage(settings, lambda storage: storage.drop_reference())
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"dropped {', '.join(dropped)}" if dropped else "no reference_* tables")
    return 0


#: The raw tables that get the reference's text timestamp column (``db reference-sql``).
REFERENCE_SQL_TABLES = ("auth_metrics", "tool_metrics", "discovery_metrics")


def _reference_sql(settings: Settings, state: str) -> int:
    enabled = None if state == "status" else state == "on"
    on = _with_storage(settings, lambda storage: storage.reference_sql(enabled))
    tables = ", ".join(REFERENCE_SQL_TABLES)
    print(f"the timestamp column of {tables} is {'on' if on else 'off'}")
    return 0


def _first_run_key(settings: Settings, service: str) -> None:
    if env_api_keys():
        return

    async def create(storage: StorageBackend) -> str | None:
        if await storage.list_keys():
            return None
        secret, _ = await auth.create_key(storage, service=service, source="first-run")
        return secret

    secret = _with_storage(settings, create)
    if secret is None:
        return
    line = "=" * 72
    print(
        f"{line}\nFirst run: created an ingest key for service {service!r}.\n"
        f"It is shown only this once (only its hash is stored); keep it:\n\n"
        f"    export METRICS_KEY={secret}\n\n"
        f"More keys: metrics-service keys create --service NAME\n{line}",
        flush=True,
    )


def _ports(settings: Settings) -> list[tuple[str, int, str]]:
    """(host, port, the variable that sets the port) for each port the service will listen on."""
    ports = [(settings.host, settings.port, "METRICS_SERVICE_PORT")]
    if settings.otel_prometheus_enabled:
        ports.append(
            (settings.otel_prometheus_host, settings.otel_prometheus_port, "OTEL_PROMETHEUS_PORT")
        )
    return ports


def _check_ports(settings: Settings) -> None:
    """Fail with one line naming the port and its variable when a port is taken, before anything
    starts (a second instance, or another program on 8890/9465)."""
    ports = _ports(settings)
    if len(ports) == 2 and ports[0][1] == ports[1][1] != 0:
        raise ConfigError(
            f"METRICS_SERVICE_PORT and OTEL_PROMETHEUS_PORT are both {ports[0][1]}; "
            "the API and the Prometheus scrape need a port each"
        )
    for host, port, variable in ports:
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"cannot resolve the listen address {host!r}: {exc}") from exc
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # The same option uvicorn and the exporter set: a port in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {port} on {host} is already in use (another instance?); "
                        f"set {variable} to a free port"
                    ) from exc
                raise ConfigError(f"cannot listen on {host}:{port} ({variable}): {exc}") from exc


def _copy_to_postgres(settings: Settings, to: str | None) -> int:
    """``db copy-to-postgres``: SQLITE_DB_PATH into ``to`` (or METRICS_DATABASE_URL)."""
    from metrics_service.storage.backend import parse_database_url

    url = parse_database_url(to or settings.database_url)
    if url is None or url.scheme != "postgresql":
        raise ConfigError(
            "db copy-to-postgres needs a PostgreSQL URL: --to postgresql://... or "
            "METRICS_DATABASE_URL"
        )
    if not settings.db_path.exists():
        raise ConfigError(f"SQLITE_DB_PATH: no SQLite database at {settings.db_path}")
    from metrics_service.storage.postgres import Backend
    from metrics_service.storage.postgres.copy import copy_from_sqlite

    async def copy() -> dict[str, int]:
        backend = Backend(settings, url)
        await backend.open()
        try:
            return await copy_from_sqlite(settings.db_path, backend)
        finally:
            await backend.close()

    copied = asyncio.run(copy())
    for table, rows in copied.items():
        print(f"{table}: {rows} rows")
    print(f"copied {settings.db_path} into {url.redacted}")
    return 0


def _check_database(settings: Settings) -> None:
    """Open (and migrate) the database ``METRICS_DATABASE_URL`` names before serving, so that a
    server that cannot be reached fails start-up with one line naming the variable (a
    ``StorageError``), not a traceback from inside the server's lifespan."""
    import asyncio

    from metrics_service.storage import create_backend

    async def check() -> None:
        backend = create_backend(settings)
        try:
            await backend.open()
        finally:
            await backend.close()

    asyncio.run(check())


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from metrics_service import logs
    from metrics_service.app import create_app
    from metrics_service.server import deadline_protocol, tune_gc

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if overrides:
        settings = load_settings(**overrides)
    env_api_keys()  # fail now, naming the variable, if one is bad
    _check_ports(settings)
    logs.setup(settings.log_level, settings.log_format.value)
    if args.first_run_key:
        _first_run_key(settings, args.first_run_key)
    if settings.database_url:
        _check_database(settings)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        timeout_keep_alive=5,
        # X-Forwarded-For is read by the service itself, and only from METRICS_TRUSTED_PROXIES
        # (auth.Authenticator.client_address); uvicorn's own rewriting would trust any local
        # peer by default, and costs a middleware layer on every request.
        proxy_headers=False,
        # uvicorn has no deadline for a request head; without one a silent connection is held
        # for ever (see metrics_service/server.py).
        http=deadline_protocol(settings.request_timeout_s),
    )
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully; a no-op handler turns
    # that into a normal return, so a clean shutdown exits 0.
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda num, _frame: received.append(num))
    tune_gc()
    uvicorn.Server(config).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "serve":
            return _serve(args, settings)
        if args.command == "keys":
            return _keys(args, settings)
        if args.command == "report":
            return _report(args, settings)
        if args.command == "retention":
            results = asyncio.run(_retention(settings, args.dry_run))
            verb = "would delete" if args.dry_run else "deleted"
            for r in results:
                state = "" if r["enabled"] else " (policy disabled)"
                print(
                    f"{r['table']}: {verb} {r['rows']} rows older than {r['retention_days']} "
                    f"days{state}"
                )
            return 0
        if args.db_command == "drop-reference":
            return _drop_reference(settings)
        if args.db_command == "reference-sql":
            return _reference_sql(settings, args.state)
        if args.db_command == "copy-to-postgres":
            return _copy_to_postgres(settings, args.to)
        stats = _with_storage(settings, lambda storage: storage.stats())
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            print(f"database {stats['path']} (schema version {stats['schema_version']})")
            if "file_bytes" in stats:
                print(f"file {stats['file_bytes']} bytes, WAL {stats['wal_bytes']} bytes")
            else:
                print(f"{stats['database_bytes']} bytes in {stats['partitions']} partitions")
            for table, count in stats["rows"].items():
                print(f"  {table}: {count} rows")
        return 0
    except (ConfigError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
