"""The Grafana dashboards, proved without a Grafana server:

1. each dashboard validates against the JSON Schema generated from Grafana's own types
   (``grafana/schema/dashboard.schema.json``, from npm ``@grafana/schema``), and each panel's
   options against its plugin's schema;
2. every panel query, with its variables substituted as Grafana would (all values, then one
   concrete value each), returns data from a real Prometheus that scraped the real service after
   realistic traffic covering every metric family;
3. every metric name used by a dashboard or an alert rule is one the service really exports.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests._helpers import (
    ADMIN_KEY,
    ROOT,
    ServiceProcess,
    free_port,
    payload,
    require_binary,
    wait_for,
)
from tests._prometheus import Prometheus, parse_samples, scrape, start_prometheus, total
from tests._spans import CLIENT, mcp, protobuf
from tests._traffic import auth, discovery, health, protocol, tool

DASHBOARDS = {p.stem: p for p in sorted((ROOT / "grafana" / "dashboards").glob("*.json"))}
SCHEMA = json.loads((ROOT / "grafana" / "schema" / "dashboard.schema.json").read_text())
RULES = ROOT / "prometheus" / "rules" / "mcp-alerts.yml"
ANALYTICS = "mcp-analytics-comprehensive"
HEALTH = "mcp-metrics-service-health"
SEMCONV = "mcp-semconv"
#: Panel plugin id -> the prefix of its definitions in the schema.
PLUGINS = {
    "timeseries": "TimeSeries",
    "stat": "Stat",
    "piechart": "PieChart",
    "bargauge": "BarGauge",
}
#: Grafana's global variables, with the values a 1 h dashboard on a 15 s scrape would give them.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
#: Names a query may use that the service does not export: Prometheus's own.
PROMETHEUS_NAMES = {"up"}
#: The concrete value each variable takes in the second pass (each must be one of its options).
CONCRETE = {"service": "gateway-eu", "server": "github", "method": "tools/call"}

KEYS = {
    "gateway-eu": "gateway-eu-key-0123456789abcdef",
    "gateway-us": "gateway-us-key-0123456789abcdef",
    "auth-server": "auth-server-key-0123456789abcdef",
    "registry": "registry-key-0123456789abcdefgh",
}


def load(name: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[name].read_text())  # type: ignore[no-any-return]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    flat: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        flat.extend(panel["panels"] if panel["type"] == "row" else [panel])
    return flat


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every query."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels(dashboard) for t in p["targets"]
    ]


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard["templating"]["list"])


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


# -- PromQL, just enough of it -----------------------------------------------------------------

_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$", re.S)
_QUERY_RESULT = re.compile(r"^query_result\((?P<expr>.*)\)$", re.S)
_SELECTOR = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)?\{(?P<matchers>[^}]*)\}")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_GROUPING = ("by", "without", "on", "ignoring", "group_left", "group_right")
_KEYWORDS = {*_GROUPING, "and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: bare identifiers that are not functions, keywords or
    label names, plus the alternatives of ``{__name__=~"a|b"}``."""
    names = {
        alt for m in re.finditer(r'__name__=~?"([^"]*)"', expr) for alt in m.group(1).split("|")
    }
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(rf"\b({'|'.join(_GROUPING)})\s*\([^)]*\)", " ", s)
    for m in _WORD.finditer(s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == "." or m.group() in _KEYWORDS:
            continue
        if s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def variable_selector(var: dict[str, Any]) -> tuple[str, str | None]:
    """(selector, label) of ``label_values(selector, label)``; (expression, None) of
    ``query_result(expression)``, whose values the variable's regex extracts."""
    if m := _QUERY_RESULT.match(var["query"]):
        assert var["regex"], f"variable {var['name']}: query_result needs a regex"
        return m.group("expr"), None
    m = _LABEL_VALUES.match(var["query"])
    assert m, (
        f"variable {var['name']}: expected label_values(selector, label) or "
        f"query_result(expression), got {var['query']!r}"
    )
    return m.group("selector"), m.group("label")


def grafana_regex(var: dict[str, Any]) -> re.Pattern[str]:
    """A variable's ``/regex/`` as a pattern (Grafana uses its first capture group)."""
    m = re.fullmatch(r"/(.*)/", var["regex"], re.S)
    assert m, f"variable {var['name']}: regex must be /.../, got {var['regex']!r}"
    return re.compile(m.group(1))


def regex_escape(value: str) -> str:
    """Grafana's escaping of one variable value inside a PromQL regex matcher."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name``, ``${name}`` and ``[[name]]`` as Grafana does; ``values`` holds the
    dashboard variables already formatted (``.*`` for All)."""
    everything = {**BUILTINS, **values}
    for name in sorted(everything, key=len, reverse=True):
        for form in (f"${{{name}}}", f"[[{name}]]", f"${name}"):
            expr = expr.replace(form, everything[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


# -- 1. the schema -----------------------------------------------------------------------------


def test_both_dashboards_are_there() -> None:
    assert set(DASHBOARDS) == {ANALYTICS, HEALTH, SEMCONV}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_matches_grafanas_schema(name: str) -> None:
    dashboard = load(name)
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(dashboard), key=str)
    assert not errors, [jsonschema.exceptions.best_match([e]).message[:300] for e in errors]
    assert dashboard["schemaVersion"] == SCHEMA["x-dashboard-schema-version"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_options_match_their_plugins_schema(name: str) -> None:
    problems = []
    for panel in panels(load(name)):
        assert panel["type"] in PLUGINS, f"{panel['title']}: no schema for plugin {panel['type']}"
        prefix = PLUGINS[panel["type"]]
        checks = [(f"{prefix}PanelOptions", panel["options"])]
        custom = panel["fieldConfig"]["defaults"].get("custom")
        if f"{prefix}FieldConfig" in SCHEMA["definitions"] and custom is not None:
            checks.append((f"{prefix}FieldConfig", custom))
        for definition, instance in checks:
            schema = {"$ref": f"#/definitions/{definition}", "definitions": SCHEMA["definitions"]}
            problems += [
                f"{panel['title']} {definition}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(instance)
            ]
    assert not problems, problems


def test_the_schema_rejects_what_grafana_would_not_load() -> None:
    """The generated schema is strict: unknown keys and wrong types are errors."""
    dashboard = load(ANALYTICS)
    validator = jsonschema.Draft7Validator(SCHEMA)
    assert validator.is_valid(dashboard)
    breakages: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d.update(refresh=30),
        lambda d: d["templating"]["list"][1].update(includeAl=True),
        lambda d: d["time"].pop("to"),
        lambda d: panels(d)[0]["gridPos"].pop("w"),
        lambda d: panels(d)[0]["fieldConfig"]["defaults"]["thresholds"].update(mode="relative"),
    ]
    for breakage in breakages:
        broken = json.loads(json.dumps(dashboard))
        breakage(broken)
        assert not validator.is_valid(broken)


def test_provisioned_datasource_is_the_dashboards_default() -> None:
    provisioning = ROOT / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [source] = datasource["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    for name in DASHBOARDS:
        dashboard = load(name)
        [var] = [v for v in variables(dashboard) if v["type"] == "datasource"]
        assert var["name"] == "datasource" and var["query"] == "prometheus"
        assert var["current"]["value"] == source["uid"]
        refs = [p["datasource"] for p in panels(dashboard)]
        refs += [t["datasource"] for p in panels(dashboard) for t in p["targets"]]
        refs += [v["datasource"] for v in variables(dashboard) if v["type"] == "query"]
        assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), name


def test_analytics_dashboard_has_the_seeds_settings_and_panels() -> None:
    dashboard = load(ANALYTICS)
    assert dashboard["title"] == "MCP Analytics Comprehensive"
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert [v["name"] for v in variables(dashboard) if v["type"] == "query"] == [
        "service",
        "server",
        "method",
    ]
    titles = {p["title"]: p for p in panels(dashboard)}
    for title in (
        "Real-time protocol activity",
        "Authentication success vs failure",
        "Auth method distribution",
        "Authentication success rate",
        "Tool execution latency",
        "Top tools by usage",
        "Protocol flow latency",
        "Client applications",
        "Error rates",
        "Discovery latency: embedding vs search",
        "Discovery result counts",
    ):
        assert title in titles, title
    rate = titles["Authentication success rate"]
    assert rate["type"] == "stat" and rate["fieldConfig"]["defaults"]["unit"] == "percent"
    assert rate["fieldConfig"]["defaults"]["thresholds"]["steps"] == [
        {"color": "red", "value": None},
        {"color": "orange", "value": 85},
        {"color": "green", "value": 95},
    ]
    latency = [t["expr"] for t in titles["Tool execution latency"]["targets"]]
    assert [e.split(",")[0] for e in latency] == [
        f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")
    ]
    assert all("mcp_tool_execution_duration_seconds_bucket" in e and "rate(" in e for e in latency)


def test_health_dashboard_covers_the_self_metrics() -> None:
    used = set().union(*(metric_names(e) for _, e in targets(load(HEALTH))))
    for name in (
        "metrics_service_metrics_accepted_total",
        "metrics_service_metrics_rejected_total",
        "metrics_service_queue_depth",
        "metrics_service_commit_duration_seconds_bucket",
        "metrics_service_rate_limited_requests_total",
        "metrics_service_export_failures_total",
        "metrics_service_database_size_bytes",
    ):
        assert name in used, name


def test_semconv_dashboard_uses_only_the_conventions_names() -> None:
    """So that it works for any exporter of the OpenTelemetry MCP semantic conventions."""
    dashboard = load(SEMCONV)
    used = set().union(*(metric_names(e) for _, e in targets(dashboard)))
    families = {n.rsplit("_", 1)[0] for n in used}
    assert families == {
        "mcp_server_operation_duration_seconds",
        "mcp_client_operation_duration_seconds",
    }
    labels = set(re.findall(r"(\w+)=~?\"", " ".join(e for _, e in targets(dashboard))))
    labels |= set(re.findall(r"by \(([^)]*)\)", " ".join(e for _, e in targets(dashboard))))
    semconv = {
        "mcp_method_name",
        "gen_ai_tool_name",
        "gen_ai_operation_name",
        "error_type",
        "network_transport",
        "mcp_protocol_version",
        "service",  # the one attribute of ours: which reporting service
    }
    names = {name.strip() for group in labels for name in group.split(",")} - {"le"}
    assert names <= semconv, names - semconv


#: A matcher on a boolean label (``success``, ``healthy``).
BOOL_MATCHER = re.compile(r'\b(success|healthy)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def test_boolean_labels_are_matched_in_both_spellings() -> None:
    """``METRICS_OTEL_BOOL_LABELS=capitalized`` (for the reference's dashboard) must not empty
    ours: every matcher on ``success``/``healthy`` takes ``true|True`` or ``false|False``."""
    queries = [(f"{n}: {w}", e) for n in DASHBOARDS for w, e in targets(load(n))]
    queries += [(f"rule {a}", e) for a, e in rule_exprs()]
    matchers = [(where, m.groups()) for where, e in queries for m in BOOL_MATCHER.finditer(e)]
    assert len(matchers) >= 9, matchers
    bad = [
        (where, g)
        for where, g in matchers
        if g[1:] not in {("=~", "true|True"), ("=~", "false|False")}
    ]
    assert not bad, bad


def test_metric_names_are_found_in_queries() -> None:
    """The name extraction that the exported-names check relies on."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, flow_step) (rate(a_bucket{x=~"$y"}[5m]))) / on (x) b'
    ) == {"a_bucket", "b"}
    assert metric_names('{__name__=~"c|d_total", s=~"$s"}') == {"c", "d_total"}
    assert metric_names('deriv(e{f="db"}[1h]) * 3600 > 100 * 1024 and absent(up)') == {"e", "up"}


# -- 2 and 3. against a real Prometheus that scraped the real service --------------------------


@dataclass
class Stack:
    service: ServiceProcess
    prom: Prometheus
    exporter_url: str

    def exported(self) -> dict[str, set[str]]:
        """Sample name -> label names, from a real scrape of the service's endpoint."""
        labels: dict[str, set[str]] = {}
        for name, lbls in parse_samples(scrape(self.exporter_url)):
            labels.setdefault(name, set()).update(k for k, _ in lbls)
        return labels

    def options(self, var: dict[str, Any], values: dict[str, str]) -> set[str]:
        """What Grafana lists for a ``label_values(selector, label)`` variable (the series of the
        range), or for a ``query_result(expression)`` one (an instant query at the range's end,
        each result written ``name{label="value", ...} value timestamp`` and matched by the
        variable's regex)."""
        selector, label = variable_selector(var)
        if label is None:
            regex, found = grafana_regex(var), set()
            for result in self.prom.query(substitute(selector, values)):
                metric = dict(result["metric"])
                name = metric.pop("__name__", "")
                text = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()))
                line = f"{name}{{{text}}} {result['value'][1]} {int(result['value'][0] * 1000)}"
                if m := regex.search(line):
                    found.add(m.group(1))
            return found
        r = httpx.get(
            f"{self.prom.url}/api/v1/series",
            params={"match[]": substitute(selector, values), "start": time.time() - 3600},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        return {s[label] for s in r.json()["data"] if label in s}


def _hold_write_lock_while_posting(client: httpx.Client, db: Path, exporter_url: str) -> None:
    """A commit fails (and is retried) while another connection holds SQLite's write lock."""

    def failures() -> float:
        return total(parse_samples(scrape(exporter_url)), "metrics_service_commit_failures_total")

    before = failures()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    codes: list[int] = []
    post = threading.Thread(
        target=lambda: codes.append(
            client.post(
                "/metrics",
                json=payload("gateway-eu", [auth(server="github")]),
                headers={"X-API-Key": KEYS["gateway-eu"]},
            ).status_code
        )
    )
    post.start()
    try:
        wait_for(lambda: failures() > before, 15, 0.01)
    finally:
        other.execute("ROLLBACK")
        other.close()
        post.join(30)
    assert codes == [200]


def _spans_over_otlp(client: httpx.Client, gateway: str) -> None:
    """MCP spans as an OpenTelemetry-instrumented server and client export them: the transports,
    protocol versions and error types of the semconv dashboard, and client-side operations."""
    server = {"mcp.server.name": "github"}
    spans = [
        mcp("tools/call", "search_code", transport="pipe", extra=server, duration_ms=40),
        mcp("tools/call", "read_file", transport="tcp", version="2025-11-25", extra=server),
        mcp("tools/call", "search_code", error_type="tool_error", extra=server, duration_ms=900),
        mcp("tools/call", "nope", error_type="-32602", extra=server),  # not a server error
        mcp("tools/call", "read_file", error_type="-32603", extra=server),
        mcp("tools/call", "search_code", kind=CLIENT, extra={"server.address": "github"}),
        mcp("tools/call", "read_file", kind=CLIENT, error_type="-32602", duration_ms=70),
    ]
    r = client.post(
        "/v1/traces",
        content=protobuf(spans, {"service.name": gateway}),
        headers={"Content-Type": "application/x-protobuf", "X-API-Key": KEYS[gateway]},
    )
    assert r.status_code == 200 and r.content == b"", r.content


def _round(client: httpx.Client, db: Path, exporter_url: str, limited_key: str) -> None:
    """One round of realistic traffic: two gateways in front of two MCP servers each, an auth
    server, a tool registry, a client with a bad payload, unknown keys, a key over its limit,
    retention of an old row and a commit that fails once."""

    def post(service: str, metrics: list[dict[str, Any]], status: int = 200) -> dict[str, Any]:
        r = client.post(
            "/metrics", json=payload(service, metrics), headers={"X-API-Key": KEYS[service]}
        )
        assert r.status_code == status, (service, r.status_code, r.text[:300])
        return r.json()  # type: ignore[no-any-return]

    for gateway in ("gateway-eu", "gateway-us"):
        events: list[dict[str, Any]] = []
        for server in ("github", "filesystem"):
            events += [
                auth(True, "jwt", server, 8),
                auth(True, "jwt", server, 15),
                auth(True, "jwt", server, 40),
                auth(True, "oauth", server, 60),
                auth(True, "oauth", server, 120),
                auth(True, "noauth", server, 1),
                auth(False, "jwt", server, 25),
                auth(False, "oauth", server, 300),
                tool(None, "initialize", server, "claude-desktop", duration_ms=4),
                tool(None, "initialize", server, "cursor", duration_ms=6),
                tool(None, "tools/list", server, "claude-desktop", duration_ms=9),
                tool(None, "tools/list", server, "cursor", duration_ms=11),
                tool("search_code", "tools/call", server, "claude-desktop", duration_ms=35),
                tool("search_code", "tools/call", server, "cursor", False, 2500, 300, 64),
                tool(
                    "read_file", "tools/call", server, "cursor", duration_ms=12, output_size=90000
                ),
                tool("read_file", "tools/call", server, "claude-desktop", duration_ms=80),
                tool("list_issues", "tools/call", server, "claude-desktop", duration_ms=450),
                protocol("initialize->tools/list", 120, server, "claude-desktop"),
                protocol("tools/list->tools/call", 2400, server, "claude-desktop"),
                protocol("initialize->tools/call", 2520, server, "claude-desktop"),
                protocol("initialize->tools/list", 80, server, "cursor"),
                health(server, duration_ms=6),
                health(server, duration_ms=30),
                health(server, server == "github", 200 if server == "github" else 503, 1800),
            ]
        events += [
            discovery("open pull requests", 5, 30, 18, 4),
            discovery("read a file", 12, 55, 40, 9),
        ]
        post(gateway, events)
        _spans_over_otlp(client, gateway)
    post("auth-server", [auth(True, "jwt", "slack", 20), auth(False, "oauth", "slack", 150)])
    post("registry", [discovery("weather", 0, 25, 20, 2), discovery("send email", 3, 70, 50, 15)])
    post("registry", [health("mcpgw", duration_ms=12), health("mcpgw", False, None, 2000)])

    # A client with two invalid items (rules "type" and "required") and one good one.
    bad = [
        auth(server="github"),
        {"type": "auth_request", "dimensions": {"success": "yes"}},
        {"type": "auth_request"},
    ]
    assert post("gateway-eu", bad)["rejected"] == 2
    # Failed authentications: no key, an unknown key.
    assert client.post("/metrics", json=payload()).status_code == 401
    unknown = client.post(
        "/metrics", json=payload(), headers={"X-API-Key": "nope-0123456789abcdef"}
    )
    assert unknown.status_code == 401
    # A key whose budget (one request a minute) is spent.
    limited = {"X-API-Key": limited_key}
    codes = {
        client.post("/metrics", json=payload("limited"), headers=limited).status_code
        for _ in range(2)
    }
    assert 429 in codes
    # Retention: an event two days old, deleted once auth_metrics keeps one day.
    admin = {"X-API-Key": ADMIN_KEY}
    policy = "/admin/retention/policies/auth_metrics"
    assert client.put(policy, json={"retention_days": None}, headers=admin).status_code == 200
    post("gateway-eu", [auth(server="github", timestamp=time.time() - 2 * 86400)])
    assert client.put(policy, json={"retention_days": 1}, headers=admin).status_code == 200
    done = client.post(
        "/admin/retention/cleanup",
        params={"table": "auth_metrics", "dry_run": "false"},
        headers=admin,
    )
    assert [t["rows"] for t in done.json()["tables"]] == [1], done.text
    _hold_write_lock_while_posting(client, db, exporter_url)


def _scraped_after(prom: Prometheus, t: float) -> None:
    wait_for(lambda: (prom.value("max(timestamp(up) and up == 1)") or 0.0) > t + 0.05, 15, 0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("dashboards")
    service = ServiceProcess(
        db_path=tmp / "m.db",
        log_path=tmp / "service.log",
        env={
            **{f"METRICS_API_KEY_{s.upper().replace('-', '_')}": k for s, k in KEYS.items()},
            "METRICS_ADMIN_API_KEY": ADMIN_KEY,
            # A collector that is down, so that export failures are counted.
            "OTEL_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "500",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            # A held write lock fails a commit within 20 ms; it is retried until released.
            "METRICS_SQLITE_BUSY_TIMEOUT_MS": "20",
            "METRICS_COMMIT_RETRIES": "100",
            "METRICS_SQLITE_SYNCHRONOUS": "normal",
        },
    )
    try:
        service.start()
        exporter_port = service.prometheus_port
        exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
        with (
            start_prometheus(tmp / "prom", [f"127.0.0.1:{exporter_port}"]) as prom,
            httpx.Client(base_url=service.url, timeout=30) as client,
        ):
            created = client.post(
                "/admin/keys",
                json={"service": "limited", "rate_limit_per_min": 1},
                headers={"X-API-Key": ADMIN_KEY},
            )
            assert created.status_code == 201, created.text
            # Two rounds with a scrape between and after them, so that every counter and
            # histogram has grown between two samples: rates are non-zero, quantiles defined.
            # (Prometheus's first scrape comes some seconds after start: round one meanwhile.)
            for _ in range(2):
                _round(client, service.db_path, exporter_url, created.json()["key"])
                _scraped_after(prom, time.time())
            yield Stack(service, prom, exporter_url)
    finally:
        service.stop()


def _failures(stack: Stack, dashboard: dict[str, Any], values: dict[str, str]) -> list[str]:
    failures = []
    for where, expr in targets(dashboard):
        query = substitute(expr, values)
        result = stack.prom.values(query)
        if not any(math.isfinite(v) for v in result):
            failures.append(f"{where}: {query} -> {result}")
    if failures:  # say why: the target's last scrape
        active = httpx.get(f"{stack.prom.url}/api/v1/targets", timeout=10).json()["data"]
        failures += [
            f"target {t['scrapeUrl']}: {t['health']} {t['lastError']!r}"
            for t in active["activeTargets"]
        ]
    return failures


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_query_returns_data(stack: Stack, name: str) -> None:
    """All variables at "All" (``.*``), then each at one concrete value from its own options."""
    dashboard = load(name)
    query_vars = [v for v in variables(dashboard) if v["type"] == "query"]
    everything = {v["name"]: v["allValue"] for v in query_vars}
    assert not _failures(stack, dashboard, everything)

    concrete: dict[str, str] = {}
    for var in query_vars:  # in order: each may depend on the ones before it
        options = stack.options(var, {**everything, **concrete})
        assert options, f"variable {var['name']} lists nothing"
        value = CONCRETE.get(var["name"], min(options))
        assert value in options, (var["name"], options)
        concrete[var["name"]] = regex_escape(value)
    assert not _failures(stack, dashboard, concrete)


def test_variables_list_what_the_traffic_sent(stack: Stack) -> None:
    by_name = {v["name"]: v for v in variables(load(ANALYTICS))}
    every = {"service": ".*", "server": ".*", "method": ".*"}
    assert stack.options(by_name["service"], every) == {*KEYS}
    # The union of the auth metrics' `server` and the other families' `server_name`: slack
    # only from auth events, the registry's servers only from its health checks.
    assert stack.options(by_name["server"], every) == {"github", "filesystem", "slack", "mcpgw"}
    assert stack.options(by_name["server"], {**every, "service": "auth-server"}) == {"slack"}
    assert stack.options(by_name["server"], {**every, "service": "registry"}) == {"mcpgw"}
    assert stack.options(by_name["method"], every) == {"initialize", "tools/list", "tools/call"}


def test_variables_filter_the_panels_they_should(stack: Stack) -> None:
    """Every selector filters by each variable whose label its metric has; the auth metrics,
    whose `method` is jwt/oauth/noauth, are not filtered by the MCP method."""
    exported = stack.exported()
    checks = {
        ANALYTICS: {
            "service": 'service=~"$service"',
            "server": 'server=~"$server"',
            "server_name": 'server_name=~"$server"',
        },
        HEALTH: {"job": 'job=~"$job"', "instance": 'instance=~"$instance"'},
        SEMCONV: {"service": 'service=~"$service"'},
    }
    problems = []
    for name, required in checks.items():
        for where, expr in targets(load(name)):
            for m in _SELECTOR.finditer(expr):
                metric, matchers = m.group("name"), m.group("matchers")
                labels = exported.get(metric, set()) | {"job", "instance"}
                wanted = [f for label, f in required.items() if label in labels]
                if name == ANALYTICS and "tool_name" in labels:
                    wanted.append('method=~"$method"')
                if name == ANALYTICS and "tool_name" not in labels and "$method" in matchers:
                    problems.append(f"{where}: {metric} must not use $method")
                problems += [f"{where}: {metric} lacks {f}" for f in wanted if f not in matchers]
    assert not problems, problems


def test_dashboards_and_rules_use_only_exported_metrics(stack: Stack) -> None:
    exported = set(stack.exported())
    queries = [(f"{n}: {w}", e) for n in DASHBOARDS for w, e in targets(load(n))]
    queries += [
        (f"{n}: variable {v['name']}", variable_selector(v)[0])
        for n in DASHBOARDS
        for v in variables(load(n))
        if v["type"] == "query"
    ]
    queries += [(f"rule {a}", e) for a, e in rule_exprs()]
    used: set[str] = set()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        assert names <= exported | PROMETHEUS_NAMES, (where, names - exported)
        used |= names
    # Prometheus's own series are there too (the service-down rule and the Up stat use them).
    assert stack.prom.values('up{job=~".+"}') == [1.0]
    # Every family the README lists is on some panel or rule.
    families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in used}
    unused = {
        n
        for n in exported
        if n.startswith(("mcp_", "metrics_service_"))
        and n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") not in families
    }
    assert not unused, unused


# -- a healthy service: the error panels show 0, not "No data" -------------------------------

#: Every query that shows failures: on a service without any, each must return 0.
_ERROR_QUERY = re.compile(
    r'rejected|failures|rate_limited|deleted_rows|(success|healthy)=~"false\|False"|error_type!=""'
)


@pytest.fixture(scope="module")
def quiet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A service that only ever gets valid traffic: no rejects, failures, limits or deletions."""
    require_binary("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("quiet")
    key = KEYS["gateway-eu"]
    service = ServiceProcess(
        db_path=tmp / "m.db",
        log_path=tmp / "service.log",
        env={"METRICS_API_KEY_GATEWAY_EU": key},
    )
    events = [
        auth(True, "jwt", "github", 8),
        tool("search_code", "tools/call", "github", "cursor", duration_ms=35),
        tool(None, "tools/list", "github", "cursor", duration_ms=9),
        protocol("initialize->tools/list", 120, "github", "cursor"),
        discovery("read a file", 12, 55, 40, 9),
    ]
    try:
        service.start()
        exporter_port = service.prometheus_port
        exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
        with (
            start_prometheus(tmp / "prom", [f"127.0.0.1:{exporter_port}"]) as prom,
            httpx.Client(base_url=service.url, timeout=30) as client,
        ):
            for _ in range(2):  # two scrapes after traffic: rates and quantiles are defined
                r = client.post(
                    "/metrics", json=payload("gateway-eu", events), headers={"X-API-Key": key}
                )
                assert r.status_code == 200 and r.json()["rejected"] == 0, r.text
                _scraped_after(prom, time.time())
            yield Stack(service, prom, exporter_url)
    finally:
        service.stop()


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_error_panels_show_zero_when_nothing_failed(quiet_stack: Stack, name: str) -> None:
    dashboard = load(name)
    everything = {v["name"]: v["allValue"] for v in variables(dashboard) if v["type"] == "query"}
    errors = [(w, e) for w, e in targets(dashboard) if _ERROR_QUERY.search(e)]
    assert len(errors) >= {HEALTH: 7, SEMCONV: 2}.get(name, 3), errors
    shown = {w: quiet_stack.prom.values(substitute(e, everything)) for w, e in errors}
    assert all(values and all(v == 0 for v in values) for values in shown.values()), shown
    # And the rest of the health dashboard has data too: nothing on it says "No data".
    if name == HEALTH:
        assert not _failures(quiet_stack, dashboard, everything)
