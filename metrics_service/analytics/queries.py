"""Analytics over the stored history: parameters, and one function per view.

Every view is an async function of a :class:`~metrics_service.storage.backend.Reader` (one
snapshot of whichever backend) and :class:`Params`, so that the HTTP routes, the ``report``
command and tests share them. Numbers come from the rollups
(``storage.rollups``), exact over any range; percentiles are estimated from fixed latency buckets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from metrics_service.errors import InvalidPayload
from metrics_service.settings import valid_service_name
from metrics_service.storage import rollups
from metrics_service.storage.backend import Reader

#: API filter name -> column, per metric family (a filter a family lacks is refused).
FILTERS: dict[str, dict[str, str]] = {
    "tool_execution": {
        "service": "service",
        "server": "server_name",
        "tool": "tool_name",
        "client": "client_name",
        "tenant": "tenant_id",
        "success": "success",
    },
    "auth_request": {"service": "service", "server": "server", "success": "success"},
    "tool_discovery": {"service": "service"},
    "protocol_latency": {"service": "service", "server": "server_name", "client": "client_name"},
    "registry_operation": {"service": "service", "success": "success"},
    "health_check": {"service": "service"},
}
RESOLUTIONS = {"minute": 60_000, "hour": rollups.HOUR_MS, "day": rollups.DAY_MS}
SORTS = ("calls", "errors", "error_rate", "p95", "tokens")
MAX_POINTS = 1500
MAX_LIMIT = 1000
_RELATIVE_RE = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_COMMON_PARAMS = {"since", "until", "format", *FILTERS["tool_execution"]}


@dataclass(frozen=True, slots=True)
class Params:
    since_ms: int
    until_ms: int
    filters: dict[str, str | int] = field(default_factory=dict)  # API name -> value
    limit: int = 10
    offset: int = 0
    sort: str = "calls"
    by: str = ""
    resolution: str = "hour"
    kind: str = "tool_execution"

    def columns(self, kind: str) -> dict[str, str | int]:
        """The filters as columns of ``kind``; refuses a filter that family does not have."""
        names = FILTERS[kind]
        unknown = [f for f in self.filters if f not in names]
        if unknown:
            raise _invalid(unknown[0], "not_applicable", f"{kind} events have no {unknown[0]}")
        return {names[f]: v for f, v in self.filters.items()}

    def echo(self) -> dict[str, Any]:
        filters = {k: (bool(v) if k == "success" else v) for k, v in self.filters.items()}
        return {"since": iso(self.since_ms), "until": iso(self.until_ms), "filters": filters}


def _invalid(field_name: str, rule: str, message: str) -> InvalidPayload:
    return InvalidPayload(
        "the query parameters are invalid",
        details=[{"field": field_name, "rule": rule, "message": message}],
    )


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(name: str, text: str, now_ms: int) -> int:
    """``24h``, ``15m``, ``7d``, ``2w`` (before now), ``now``, ISO 8601 (no offset = UTC) or unix
    seconds -> unix ms."""
    text = text.strip()
    if text == "now":
        return now_ms
    match = _RELATIVE_RE.match(text)
    if match:
        return now_ms - int(match.group(1)) * _UNIT_MS[match.group(2)]
    try:
        return int(float(text) * 1000) if re.fullmatch(r"\d{1,12}(\.\d+)?", text) else _iso_ms(text)
    except ValueError:
        raise _invalid(
            name,
            "format",
            "must be an ISO 8601 time, unix seconds, 'now' or a duration like 24h, 30m, 7d",
        ) from None


def _iso_ms(text: str) -> int:
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"-?\d{1,9}", text.strip()):
        raise _invalid(name, "integer", "must be an integer")
    value = int(text)
    if value < low:
        raise _invalid(name, "ge", f"must be >= {low}")
    if value > high:
        raise _invalid(name, "le", f"must be <= {high}")
    return value


def _choice(query: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = query.get(name, choices[0])
    if value not in choices:
        raise _invalid(name, "enum", "must be one of " + ", ".join(choices))
    return value


def parse_params(
    query: Mapping[str, str],
    *,
    by: tuple[str, ...] = ("",),
    extra: tuple[str, ...] = (),
    max_string_length: int = 256,
    now_ms: int | None = None,
) -> Params:
    """Validate query parameters; raise ``InvalidPayload`` naming the field and rule."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    allowed = _COMMON_PARAMS | set(extra) | ({"by"} if by != ("",) else set())
    for name in query:
        if name not in allowed:
            raise _invalid(
                name, "unknown", "not a parameter of this endpoint: " + ", ".join(sorted(allowed))
            )
    until = parse_time("until", query.get("until", "now"), now_ms)
    since = parse_time(
        "since", query.get("since", "24h"), now_ms if "until" not in query else until
    )
    if since >= until:
        raise _invalid("since", "order", "must be before until")
    filters: dict[str, str | int] = {}
    for name in FILTERS["tool_execution"]:
        value = query.get(name)
        if value is None:
            continue
        if name == "success":
            if value not in ("true", "false"):
                raise _invalid(name, "enum", "must be true or false")
            filters[name] = int(value == "true")
        elif not value:
            raise _invalid(name, "min_length", "must not be empty")
        elif len(value) > max_string_length:
            raise _invalid(name, "max_length", f"must be at most {max_string_length} characters")
        elif name == "service" and not valid_service_name(value):
            raise _invalid(name, "pattern", "not a valid service name")
        else:
            filters[name] = value
    params = Params(
        since_ms=since,
        until_ms=until,
        filters=filters,
        limit=_int(query, "limit", 10, 1, MAX_LIMIT),
        offset=_int(query, "offset", 0, 0, 1_000_000),
        sort=_choice(query, "sort", SORTS),
        by=_choice(query, "by", by),
        resolution=_choice(query, "resolution", ("hour", "minute", "day")),
        kind=_choice(query, "type", tuple(FILTERS)),
    )
    if "resolution" in extra:
        points = -(-(until - since) // RESOLUTIONS[params.resolution])
        if points > MAX_POINTS:
            raise _invalid(
                "resolution",
                "max_points",
                f"{points} points; at most {MAX_POINTS}: use a coarser resolution or a shorter "
                "range",
            )
    return params


# -- aggregation helpers -----------------------------------------------------------------------


async def _grouped(
    reader: Reader,
    p: Params,
    kind: str,
    group: tuple[str, ...],
    series_ms: int | None = None,
    present: tuple[str, ...] = (),
) -> tuple[rollups.Cube, dict[tuple[Any, ...], tuple[list[Any], float]], str]:
    """States by ``(time, *group)`` with the calls of failed events, folded over ``success``;
    only of the events that have every ``present`` dimension."""
    has_success = "success" in FILTERS[kind]
    columns = p.columns(kind)
    query = rollups.Query(
        kind,
        p.since_ms,
        p.until_ms,
        (*group, "success") if has_success else group,
        columns,
        series_ms,
        present,
    )
    cube, out, source = await reader.aggregate(query)
    folded: dict[tuple[Any, ...], tuple[list[Any], float]] = {}
    for key, st in out.items():
        k = key[:-1] if has_success else key
        errors = st[1] if has_success and key[-1] == 0 else 0.0
        have = folded.get(k)
        if have is None:
            folded[k] = (st, errors)
        else:
            rollups.merge(cube, have[0], st)
            folded[k] = (have[0], have[1] + errors)
    return cube, folded, source


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 6)


def _latency(cube: rollups.Cube, st: list[Any], column: str = "duration_ms") -> dict[str, Any]:
    o = cube.hist_offset(column)
    n = st[o]

    def q(x: float) -> float | None:
        v = rollups.percentile(cube, st, column, x)
        return None if v is None else round(v, 3)

    return {
        "count": n,
        "avg": round(st[o + 1] / n, 3) if n else None,
        "p50": q(0.5),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": st[o + 3] if n else None,
    }


def _calls(cube: rollups.Cube, st: list[Any], errors: float) -> dict[str, Any]:
    calls = st[1]
    row: dict[str, Any] = {
        "calls": _num(calls),
        "errors": _num(errors),
        "error_rate": round(errors / calls, 6) if calls else None,
    }
    if "duration_ms" in cube.hists:
        row["latency_ms"] = _latency(cube, st)
    if "input_tokens" in cube.sums:
        row["input_tokens"] = int(st[2])
        row["output_tokens"] = int(st[3])
    return row


_SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "calls": lambda r: r["calls"],
    "errors": lambda r: r["errors"],
    "error_rate": lambda r: r["error_rate"] or 0,
    "p95": lambda r: (r.get("latency_ms") or {}).get("p95") or 0,
    "tokens": lambda r: r.get("input_tokens", 0) + r.get("output_tokens", 0),
}


def _page(
    p: Params, rows: list[dict[str, Any]], source: str, names: tuple[str, ...]
) -> dict[str, Any]:
    rows.sort(key=lambda r: tuple(str(r[n]) for n in names))
    rows.sort(key=_SORT_KEYS[p.sort], reverse=True)
    return {
        **p.echo(),
        "source": source,
        "sort": p.sort,
        "total": len(rows),
        "limit": p.limit,
        "offset": p.offset,
        "rows": rows[p.offset : p.offset + p.limit],
    }


def _value(v: Any) -> Any:
    return None if v == "" else v


async def _breakdown(
    reader: Reader,
    p: Params,
    group: tuple[str, ...],
    names: tuple[str, ...],
    skip_empty: str | None = None,
) -> dict[str, Any]:
    cube, folded, source = await _grouped(reader, p, "tool_execution", group)
    rows = []
    for key, (st, errors) in folded.items():
        labels = dict(zip(names, map(_value, key[1:]), strict=True))
        if skip_empty is not None and labels[skip_empty] is None:
            continue
        rows.append({**labels, **_calls(cube, st, errors)})
    return _page(p, rows, source, names)


# -- views -------------------------------------------------------------------------------------


def _no_calls() -> dict[str, Any]:
    latency = {"count": 0, "avg": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "calls": 0,
        "errors": 0,
        "error_rate": None,
        "latency_ms": latency,
        "input_tokens": 0,
        "output_tokens": 0,
    }


async def _tool_calls(
    reader: Reader, p: Params, series_ms: int | None = None
) -> tuple[rollups.Cube, dict[int, tuple[list[Any], float]]]:
    """States of the calls that name a tool (``tools/call``: the rows of the tools view), by time
    bucket; from a cube with the tool, so that every filter is read from a rollup as the tools
    view is, but not grouped by it (an hour series by tool is tens of thousands of states)."""
    cube, folded, _ = await _grouped(
        reader, p, "tool_execution", (), series_ms, present=("tool_name",)
    )
    return cube, {t: state for (t,), state in folded.items()}


async def summary(reader: Reader, p: Params) -> dict[str, Any]:
    """Calls (every MCP method call), errors, latency percentiles, tokens, distinct clients, and
    authentications with distinct hashed users when the filters apply to them; tool_calls: the
    same for tools/call alone.

    ``tool_calls`` holds the calls that name a tool, the rows of the tools view."""
    cube, folded, source = await _grouped(reader, p, "tool_execution", ())
    st, errors = folded.get((0,), (None, 0.0))
    _, clients, _ = await _grouped(reader, p, "tool_execution", ("client_name",))
    tool_cube, tool_calls = await _tool_calls(reader, p)
    auth: dict[str, Any] | None = None
    users: int | None = None
    if set(p.filters) <= set(FILTERS["auth_request"]):
        _, afolded, _ = await _grouped(reader, p, "auth_request", ())
        ast, afail = afolded.get((0,), (None, 0.0))
        _, ufolded, _ = await _grouped(reader, p, "auth_request", ("user_hash",))
        users = sum(1 for k, (s, _) in ufolded.items() if k[1] != "" and s[1] > 0)
        requests = ast[1] if ast else 0
        auth = {
            "requests": _num(requests),
            "failures": _num(afail),
            "success_rate": round(1 - afail / requests, 6) if requests else None,
        }
    body = _calls(cube, st, errors) if st else _no_calls()
    tool_st, tool_errors = tool_calls.get(0, (None, 0.0))
    distinct = sum(1 for k, (s, _) in clients.items() if k[1] != "" and s[1] > 0)
    return {
        **p.echo(),
        "source": source,
        **body,
        "distinct_clients": distinct,
        "distinct_users": users,
        "auth": auth,
        "tool_calls": _calls(tool_cube, tool_st, tool_errors) if tool_st else _no_calls(),
    }


async def tools(reader: Reader, p: Params) -> dict[str, Any]:
    """``tools/call`` by tool (and its server and service)."""
    return await _breakdown(
        reader, p, ("service", "server_name", "tool_name"), ("service", "server", "tool"), "tool"
    )


async def clients(reader: Reader, p: Params) -> dict[str, Any]:
    """MCP method calls by client application (``by=client``) or by agent id (``by=agent``)."""
    if p.by == "agent":
        return await _breakdown(reader, p, ("agent_id",), ("agent",))
    return await _breakdown(reader, p, ("client_name",), ("client",))


async def services(reader: Reader, p: Params) -> dict[str, Any]:
    """MCP method calls by reporting service (``by=service``) or by service and server
    (``by=server``)."""
    if p.by == "server":
        return await _breakdown(reader, p, ("service", "server_name"), ("service", "server"))
    return await _breakdown(reader, p, ("service",), ("service",))


async def tenants(reader: Reader, p: Params) -> dict[str, Any]:
    """Calls and token counts by tenant (``by=tenant``), or by tenant and tool (``by=tool``):
    the export for billing and cost allocation."""
    if p.by == "tool":
        return await _breakdown(reader, p, ("tenant_id", "tool_name"), ("tenant", "tool"))
    return await _breakdown(reader, p, ("tenant_id",), ("tenant",))


async def users(reader: Reader, p: Params) -> dict[str, Any]:
    """Authentications by hashed user."""
    _, folded, source = await _grouped(reader, p, "auth_request", ("user_hash",))
    rows = []
    for key, (st, failures) in folded.items():
        if key[1] == "":
            continue
        rows.append(
            {
                "user": key[1],
                "calls": _num(st[1]),
                "errors": _num(failures),
                "error_rate": round(failures / st[1], 6) if st[1] else None,
            }
        )
    return _page(p, rows, source, ("user",))


async def auth(reader: Reader, p: Params) -> dict[str, Any]:
    """Authentication success by method, with latency."""
    cube, folded, source = await _grouped(reader, p, "auth_request", ("method",))
    rows = [{"method": _value(k[1]), **_calls(cube, st, fail)} for k, (st, fail) in folded.items()]
    for row in rows:
        row["success_rate"] = None if row["error_rate"] is None else round(1 - row["error_rate"], 6)
    return _page(p, rows, source, ("method",))


async def discovery(reader: Reader, p: Params) -> dict[str, Any]:
    """Tool discovery searches by service: results, and total latency split into embedding and
    index search."""
    cube, folded, source = await _grouped(reader, p, "tool_discovery", ("service",))
    rows = []
    for key, (st, _) in folded.items():
        rows.append(
            {
                "service": key[1],
                "calls": _num(st[1]),
                "avg_results": round(st[2] / st[0], 3) if st[0] else None,
                "latency_ms": {
                    "total": _latency(cube, st, "duration_ms"),
                    "embedding": _latency(cube, st, "embedding_time_ms"),
                    "search": _latency(cube, st, "search_time_ms"),
                },
            }
        )
    return _page(p, rows, source, ("service",))


async def protocol(reader: Reader, p: Params) -> dict[str, Any]:
    """Protocol flow latency by step (``initialize->tools/list``, ...)."""
    cube, folded, source = await _grouped(reader, p, "protocol_latency", ("flow_step",))
    rows = [
        {"flow_step": _value(k[1]), "calls": _num(st[1]), "latency_ms": _latency(cube, st)}
        for k, (st, _) in folded.items()
    ]
    return _page(p, rows, source, ("flow_step",))


async def registry(reader: Reader, p: Params) -> dict[str, Any]:
    """Registry operations (the MCP Gateway Registry's ``registry_operation``) by operation and
    resource type: calls, failures, latency."""
    cube, folded, source = await _grouped(
        reader, p, "registry_operation", ("operation", "resource_type")
    )
    rows = [
        {"operation": _value(k[1]), "resource_type": _value(k[2]), **_calls(cube, st, fail)}
        for k, (st, fail) in folded.items()
    ]
    return _page(p, rows, source, ("operation", "resource_type"))


async def health(reader: Reader, p: Params) -> dict[str, Any]:
    """Health checks by endpoint: checks, unhealthy ones (``errors``), latency."""
    cube, out, source = await reader.aggregate(
        rollups.Query(
            "health_check",
            p.since_ms,
            p.until_ms,
            ("endpoint", "healthy"),
            p.columns("health_check"),
        ),
    )
    folded: dict[Any, tuple[list[Any], float]] = {}
    for (_, endpoint, healthy), st in out.items():
        unhealthy = st[1] if healthy == 0 else 0.0
        have = folded.get(endpoint)
        if have is None:
            folded[endpoint] = (st, unhealthy)
        else:
            rollups.merge(cube, have[0], st)
            folded[endpoint] = (have[0], have[1] + unhealthy)
    rows = []
    for endpoint, (st, unhealthy) in folded.items():
        row = {"endpoint": _value(endpoint), **_calls(cube, st, unhealthy)}
        row["healthy_rate"] = None if row["error_rate"] is None else round(1 - row["error_rate"], 6)
        rows.append(row)
    return _page(p, rows, source, ("endpoint",))


async def timeseries(reader: Reader, p: Params) -> dict[str, Any]:
    """Calls, errors and latency percentiles per minute, hour or day (``type`` picks the
    family; for tool executions each point also has ``tool_calls``, as in the summary); empty
    intervals are present with zero calls."""
    width = RESOLUTIONS[p.resolution]
    tool_calls: dict[int, tuple[list[Any], float]] | None = None
    cube, folded, source = await _grouped(reader, p, p.kind, (), width)
    if p.kind == "tool_execution":
        tool_cube, tool_calls = await _tool_calls(reader, p, width)
    points = []
    start = p.since_ms // width * width
    for t in range(start, p.until_ms, width):
        st, errors = folded.get((t,), (None, 0.0))
        point: dict[str, Any] = {"t": iso(t)}
        if st is None:
            point.update({"calls": 0, "errors": 0, "error_rate": None})
            if "duration_ms" in cube.hists:
                point["latency_ms"] = {
                    "count": 0,
                    "avg": None,
                    "p50": None,
                    "p95": None,
                    "p99": None,
                    "max": None,
                }
        else:
            point.update(_calls(cube, st, errors))
        point.pop("input_tokens", None)
        point.pop("output_tokens", None)
        if tool_calls is not None:
            tool_st, tool_errors = tool_calls.get(t, (None, 0.0))
            tool = _calls(tool_cube, tool_st, tool_errors) if tool_st else _no_calls()
            point["tool_calls"] = {
                k: tool[k] for k in ("calls", "errors", "error_rate", "latency_ms")
            }
        points.append(point)
    return {
        **p.echo(),
        "source": source,
        "type": p.kind,
        "resolution": p.resolution,
        "points": points,
    }


#: view -> (function, allowed ``by`` values, extra parameters)
View = Callable[[Reader, Params], Awaitable[dict[str, Any]]]
VIEWS: dict[str, tuple[View, tuple[str, ...], tuple[str, ...]]] = {
    "summary": (summary, ("",), ()),
    "tools": (tools, ("",), ("limit", "offset", "sort")),
    "clients": (clients, ("client", "agent"), ("limit", "offset", "sort")),
    "services": (services, ("service", "server"), ("limit", "offset", "sort")),
    "tenants": (tenants, ("tenant", "tool"), ("limit", "offset", "sort")),
    "users": (users, ("",), ("limit", "offset", "sort")),
    "auth": (auth, ("",), ("limit", "offset", "sort")),
    "discovery": (discovery, ("",), ("limit", "offset", "sort")),
    "protocol": (protocol, ("",), ("limit", "offset", "sort")),
    "registry": (registry, ("",), ("limit", "offset", "sort")),
    "health": (health, ("",), ("limit", "offset", "sort")),
    "timeseries": (timeseries, ("",), ("resolution", "type")),
}


async def run(
    reader: Reader, view: str, query: Mapping[str, str], max_string_length: int = 256
) -> dict[str, Any]:
    """Parse ``query`` for ``view`` and answer it from ``reader`` (one snapshot:
    ``StorageBackend.analytics``)."""
    fn, by, extra = VIEWS[view]
    params = parse_params(query, by=by, extra=extra, max_string_length=max_string_length)
    return await fn(reader, params)


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects -> one level, keys joined by ``_`` (for CSV and tables)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = value
    return out
