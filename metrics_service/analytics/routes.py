"""HTTP routes: ``GET /analytics/<view>`` (viewer or admin key; JSON, or CSV with ``format=csv``)
and the overview page ``/ui``."""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from metrics_service.analytics import queries
from metrics_service.api import _ERRORS, APIKey, client_address, json_response, state
from metrics_service.errors import InvalidPayload, NotFound

router = APIRouter(tags=["analytics"])

_PARAMETERS = {
    "since": "Start: ISO 8601, unix seconds, or a duration before now (24h, 30m, 7d). Default 24h.",
    "until": "End (exclusive), same forms. Default now.",
    "service": "Only this reporting service.",
    "server": "Only this server (auth server or MCP server).",
    "tool": "Only this tool.",
    "client": "Only this client application.",
    "tenant": "Only this tenant (tool_execution metadata tenant_id).",
    "success": "true or false.",
    "format": "json (default) or csv.",
    "limit": "Rows per page, 1..1000 (default 10).",
    "offset": "Rows to skip (default 0).",
    "sort": "calls (default), errors, error_rate, p95 or tokens; descending.",
    "by": "Grouping (see the endpoint).",
    "resolution": "minute, hour (default) or day; at most 1500 points.",
    "type": "tool_execution (default), auth_request, tool_discovery, protocol_latency,"
    " registry_operation or health_check.",
}


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula to a spreadsheet: quote it (OWASP CSV injection).
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def _latency_columns(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{q}" for q in ("count", "avg", "p50", "p95", "p99", "max"))


_CALLS = ("calls", "errors", "error_rate", *_latency_columns("latency_ms"))
_TOOL_CALLS = (*_CALLS, "input_tokens", "output_tokens")
#: The CSV header of each breakdown, by (view, ``by``), for an export with no rows (a non-empty
#: export takes its header from the rows; tests/test_analytics_routes.py checks that they agree).
CSV_COLUMNS: dict[tuple[str, str], tuple[str, ...]] = {
    ("tools", ""): ("service", "server", "tool", *_TOOL_CALLS),
    ("clients", "client"): ("client", *_TOOL_CALLS),
    ("clients", "agent"): ("agent", *_TOOL_CALLS),
    ("services", "service"): ("service", *_TOOL_CALLS),
    ("services", "server"): ("service", "server", *_TOOL_CALLS),
    ("tenants", "tenant"): ("tenant", *_TOOL_CALLS),
    ("tenants", "tool"): ("tenant", "tool", *_TOOL_CALLS),
    ("users", ""): ("user", "calls", "errors", "error_rate"),
    ("auth", ""): ("method", *_CALLS, "success_rate"),
    ("discovery", ""): (
        "service",
        "calls",
        "avg_results",
        *_latency_columns("latency_ms_total"),
        *_latency_columns("latency_ms_embedding"),
        *_latency_columns("latency_ms_search"),
    ),
    ("protocol", ""): ("flow_step", "calls", *_latency_columns("latency_ms")),
    ("registry", ""): ("operation", "resource_type", *_CALLS),
    ("health", ""): ("endpoint", *_CALLS, "healthy_rate"),
}


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = ()) -> str:
    """Rows flattened to CSV; ``columns`` is the header when there are no rows."""
    flat = [queries.flatten(r) for r in rows]
    header: dict[str, None] = {} if flat else dict.fromkeys(columns)
    for row in flat:
        header.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in flat:
        writer.writerow([_csv_cell(row.get(h)) for h in header])
    return out.getvalue()


def csv_rows(view: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    if view == "timeseries":
        return list(body["points"])
    if view == "summary":
        return [{k: v for k, v in body.items() if k not in ("filters", "source")}]
    return list(body["rows"])


def _route(view: str) -> Any:
    fn, by, extra = queries.VIEWS[view]

    async def endpoint(request: Request, x_api_key: APIKey = None) -> Response:
        app = state(request)
        # The key's budget was spent before (route_limits, per key and per address).
        await app.authenticator.authenticate(x_api_key, client_address(request), "viewer", "admin")
        query = dict(request.query_params)
        if len(query) != len(request.query_params.multi_items()):
            raise InvalidPayload(
                "the query parameters are invalid",
                details=[
                    {"field": "query", "rule": "unique", "message": "each parameter at most once"}
                ],
            )
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidPayload(
                "the query parameters are invalid",
                details=[
                    {"field": "format", "rule": "enum", "message": "must be one of json, csv"}
                ],
            )
        params = queries.parse_params(
            query, by=by, extra=extra, max_string_length=app.settings.max_string_length
        )
        body = await app.storage.analytics(lambda reader: fn(reader, params))
        if fmt == "csv":
            return Response(
                to_csv(csv_rows(view, body), CSV_COLUMNS.get((view, params.by), ())),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{view}.csv"'},
            )
        return json_response(body)

    names = [
        "since",
        "until",
        "service",
        "server",
        "tool",
        "client",
        "tenant",
        "success",
        "format",
        *extra,
    ]
    if by != ("",):
        names.append("by")
    parameters = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": _PARAMETERS[n] + (f" One of: {', '.join(by)}." if n == "by" else ""),
        }
        for n in names
    ]
    router.add_api_route(
        f"/analytics/{view}",
        endpoint,
        methods=["GET"],
        name=f"analytics_{view}",
        summary=(fn.__doc__ or view).split("\n\n")[0].replace("\n", " "),
        responses={
            **_ERRORS,
            422: {"description": "A query parameter is invalid (field and rule in details)."},
        },
        openapi_extra={"parameters": parameters},
    )


for _view in queries.VIEWS:
    _route(_view)


_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "docs.js": "text/javascript; charset=utf-8",
}
#: Swagger UI for /docs, vendored by scripts/vendor-swagger-ui (Apache-2.0, licence beside it).
_SWAGGER_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
#: Everything the page needs is its own script and style; it talks only to this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


#: /docs: Swagger UI draws its icons from data: URIs; otherwise the same as the page's.
DOCS_CSP = CSP.replace("img-src 'self';", "img-src 'self' data:;")


def _asset(name: str, folder: str = "") -> bytes:
    root = resources.files("metrics_service.ui")
    return (root.joinpath(folder) if folder else root).joinpath(name).read_bytes()


def _page(name: str, csp: str) -> Response:
    # X-Frame-Options and Referrer-Policy come with every response (app.RequestIdMiddleware).
    return Response(
        _asset(name),
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": csp},
    )


@router.get("/ui", include_in_schema=False)
async def ui_page() -> Response:
    """The overview page; it reads /analytics with a viewer key kept in sessionStorage."""
    return _page("index.html", CSP)


@router.get("/docs", include_in_schema=False)
async def docs_page() -> Response:
    """Interactive API docs (Swagger UI) from the package's own files: no CDN, works offline."""
    return _page("docs.html", DOCS_CSP)


@router.get("/ui/swagger-ui/{name}", include_in_schema=False)
async def swagger_asset(name: str) -> Response:
    media = _SWAGGER_ASSETS.get(name)
    if media is None:
        raise NotFound("no such asset")
    return Response(
        _asset(name, "swagger-ui"),
        media_type=media,
        headers={"Content-Security-Policy": DOCS_CSP},
    )


@router.get("/ui/{name}", include_in_schema=False)
async def ui_asset(name: str) -> Response:
    media = _ASSETS.get(name)
    if media is None:
        raise NotFound("no such asset")
    return Response(_asset(name), media_type=media, headers={"Content-Security-Policy": CSP})
