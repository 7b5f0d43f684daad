"""The overview page in a real headless Chromium (Debian's, driven by playwright): every number it
shows is read from the DOM and compared with the /analytics answer for the same range, at a
desktop and a phone width, in the overview and in a tool's own view; its CSV links download
what the API exports; the latency chart draws a lone interval and breaks at empty ones.
Screenshots are saved under the test's tmp_path."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from tests._analytics_seed import handshakes, make_seed
from tests._helpers import INGEST_KEY, OTHER_KEY, ServiceProcess, cli

LOAD_MS = 15_000
NOTHING = "\N{EN DASH}"  # what the page shows for a value the API answers null

# -- what each number on the page is, written here independently of the page's script ---------

#: card id -> (answer, path in it)
OVERVIEW_CARDS = {
    "tool-calls": ("summary", "tool_calls.calls"),
    "tool-errors": ("summary", "tool_calls.errors"),
    "tool-error-rate": ("summary", "tool_calls.error_rate"),
    "tool-p50": ("summary", "tool_calls.latency_ms.p50"),
    "tool-p95": ("summary", "tool_calls.latency_ms.p95"),
    "tool-p99": ("summary", "tool_calls.latency_ms.p99"),
    "tool-input-tokens": ("summary", "tool_calls.input_tokens"),
    "tool-output-tokens": ("summary", "tool_calls.output_tokens"),
    "requests": ("summary", "calls"),
    "request-errors": ("summary", "errors"),
    "request-error-rate": ("summary", "error_rate"),
    "request-p95": ("summary", "latency_ms.p95"),
    "distinct-clients": ("summary", "distinct_clients"),
    "auth-requests": ("summary", "auth.requests"),
    "auth-failures": ("summary", "auth.failures"),
    "auth-success": ("summary", "auth.success_rate"),
    "users": ("summary", "distinct_users"),
}
TOOL_CARDS = {
    "one-tool-calls": ("summary", "tool_calls.calls"),
    "one-tool-errors": ("summary", "tool_calls.errors"),
    "one-tool-error-rate": ("summary", "tool_calls.error_rate"),
    "one-tool-p50": ("summary", "tool_calls.latency_ms.p50"),
    "one-tool-p95": ("summary", "tool_calls.latency_ms.p95"),
    "one-tool-p99": ("summary", "tool_calls.latency_ms.p99"),
    "one-tool-clients": ("summary", "distinct_clients"),
    "one-tool-input-tokens": ("summary", "tool_calls.input_tokens"),
    "one-tool-output-tokens": ("summary", "tool_calls.output_tokens"),
}
_CALLS = [("Calls", "calls"), ("Errors", "errors"), ("Error rate", "error_rate")]
_TOKENS = [("Input tokens", "input_tokens"), ("Output tokens", "output_tokens")]
#: table id -> (view, extra parameters, [(header, path in a row)])
OVERVIEW_TABLES: dict[str, tuple[str, dict[str, str], list[tuple[str, str]]]] = {
    "tools": (
        "tools",
        {},
        [("Tool", "tool"), ("Server", "server"), *_CALLS, ("p95 ms", "latency_ms.p95")],
    ),
    "clients": (
        "clients",
        {"by": "client"},
        [
            ("Client", "client"),
            ("Requests", "calls"),
            ("Errors", "errors"),
            ("Error rate", "error_rate"),
            ("p95 ms", "latency_ms.p95"),
        ],
    ),
    "tenants": (
        "tenants",
        {"by": "tenant"},
        [("Tenant", "tenant"), ("Requests", "calls"), ("Errors", "errors"), *_TOKENS],
    ),
    "agents": (
        "clients",
        {"by": "agent"},
        [("Agent", "agent"), ("Requests", "calls"), ("Errors", "errors"), *_TOKENS],
    ),
    "auth": (
        "auth",
        {},
        [
            ("Method", "method"),
            ("Requests", "calls"),
            ("Failures", "errors"),
            ("Success rate", "success_rate"),
            ("p50 ms", "latency_ms.p50"),
            ("p95 ms", "latency_ms.p95"),
        ],
    ),
    "discovery": (
        "discovery",
        {},
        [
            ("Service", "service"),
            ("Searches", "calls"),
            ("Avg results", "avg_results"),
            ("p50 ms", "latency_ms.total.p50"),
            ("p95 ms", "latency_ms.total.p95"),
            ("Embedding p95 ms", "latency_ms.embedding.p95"),
            ("Index search p95 ms", "latency_ms.search.p95"),
        ],
    ),
    "protocol": (
        "protocol",
        {},
        [
            ("Flow step", "flow_step"),
            ("Count", "calls"),
            ("p50 ms", "latency_ms.p50"),
            ("p95 ms", "latency_ms.p95"),
            ("p99 ms", "latency_ms.p99"),
        ],
    ),
}
_ONE_TOOL = [*_CALLS, ("p95 ms", "latency_ms.p95"), *_TOKENS]
TOOL_TABLES: dict[str, tuple[str, dict[str, str], list[tuple[str, str]]]] = {
    "tool-clients": ("clients", {"by": "client"}, [("Client", "client"), *_ONE_TOOL]),
    "tool-tenants": ("tenants", {"by": "tenant"}, [("Tenant", "tenant"), *_ONE_TOOL]),
}

#: Everything the checks need from the DOM of the visible <main>, read in one go (so that a
#: refresh cannot land half-way).
READ_PAGE = """() => {
  const main = [...document.querySelectorAll("main")].find((m) => !m.hidden);
  const shape = (node) => node.getAttribute("class").split(" ");
  const out = { view: main.id, since: main.dataset.since, until: main.dataset.until,
                title: (main.querySelector("#tool-title") || {}).textContent || null,
                cards: {}, tables: {}, bars: [], dots: [], paths: {}, numbers: 0 };
  for (const dd of main.querySelectorAll("dd")) out.cards[dd.id] = dd.textContent;
  for (const div of main.querySelectorAll("div.table")) {
    const table = div.querySelector("table");
    out.tables[div.id] = {
      headers: [...table.tHead.rows[0].cells].map((c) => c.textContent),
      rows: [...table.tBodies[0].rows].filter((r) => !r.querySelector(".empty"))
        .map((r) => [...r.cells].map((c) => c.textContent)),
      links: [...div.querySelectorAll("a.csv")].map((a) => a.getAttribute("href")),
      more: (div.querySelector(".more") || {}).textContent || null,
    };
  }
  for (const figure of main.querySelectorAll("figure")) {
    const chart = figure.querySelector(".chart").id;
    for (const r of figure.querySelectorAll("rect.bar")) {
      out.bars.push([chart, shape(r)[1], r.dataset.t, Number(r.dataset.value),
                     Number(r.getAttribute("height")), r.querySelector("title").textContent]);
    }
    for (const c of figure.querySelectorAll("circle.point")) {
      out.dots.push([chart, shape(c)[1], c.dataset.t, Number(c.dataset.value),
                     Number(c.getAttribute("cy")), c.querySelector("title").textContent]);
    }
    for (const p of figure.querySelectorAll("path.line")) {
      out.paths[chart + " " + shape(p)[1]] = p.getAttribute("d");
    }
  }
  out.numbers = main.querySelectorAll("dd, td:not(.empty)").length;
  out.timeseries_link = (main.querySelector("figcaption a.csv") || {}).href || null;
  return out;
}"""


# -- fixtures ----------------------------------------------------------------------------------


def viewer_key(service: ServiceProcess) -> str:
    created = cli(service.db_path, "keys", "create", "--role", "viewer")
    assert created.returncode == 0, created.stderr
    return next(w for w in created.stdout.split() if w.startswith("mcpm_"))


def post(service: ServiceProcess, metrics: list[dict[str, Any]], key: str = INGEST_KEY) -> None:
    name = "svc" if key == INGEST_KEY else "other"
    r = httpx.post(
        service.url + "/metrics",
        json={"service": name, "version": "1", "metrics": metrics},
        headers={"X-API-Key": key},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["accepted"] == len(metrics), r.text


class Page:
    """A page of the real browser with console errors, page errors and CSP violations kept."""

    def __init__(self, browser: Any, service: ServiceProcess, width: int, height: int) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.width = width
        self.problems: list[str] = []
        self.page.on(
            "console",
            lambda m: self.problems.append(m.text) if m.type in ("error", "warning") else None,
        )
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        response = self.page.goto(service.url + "/ui")
        csp = response.headers["content-security-policy"]
        assert response.status == 200 and "default-src 'none'" in csp and "script-src 'self'" in csp
        assert response.headers["x-frame-options"] == "DENY"  # once, not twice

    def connect(self, key: str, range_: str = "7d", service: str | None = None) -> None:
        self.page.fill("#key", key)
        self.page.click("#key-form button[type=submit]")
        if service is not None:
            self.page.fill("#service", service)
            self.page.dispatch_event("#service", "change")
        self.page.select_option("#range", range_)
        self.page.wait_for_selector(
            f"#overview[data-range='{range_}'][data-service='{service or ''}']", timeout=LOAD_MS
        )

    def read(self) -> dict[str, Any]:
        return dict(self.page.evaluate(READ_PAGE))


class Api:
    """The same questions the page asks, over HTTP with the same key."""

    def __init__(self, service: ServiceProcess, key: str) -> None:
        self.url = service.url
        self.headers = {"X-API-Key": key}

    def get(self, view: str, query: dict[str, str]) -> Any:
        r = httpx.get(f"{self.url}/analytics/{view}", params=query, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json() if query.get("format") != "csv" else r.text


# -- comparing ---------------------------------------------------------------------------------


def at(body: Any, path: str) -> Any:
    for part in path.split("."):
        body = None if body is None else body[part]
    return body


_NUMBER_RE = re.compile(r"^-?[\d,]+(\.\d+)?$")


def same_number(text: str, value: Any) -> bool:
    """The shown ``text`` is ``value`` rounded to the digits shown (a rate as a percentage)."""
    if value is None:
        return text == NOTHING
    percent = text.endswith(" %")
    shown = text.removesuffix(" %").removesuffix(" ms")
    if not _NUMBER_RE.match(shown):
        return False
    digits = len(shown.partition(".")[2])
    expected = value * 100 if percent else value
    return math.isclose(float(shown.replace(",", "")), expected, abs_tol=0.5 * 10**-digits + 1e-9)


def same_label(text: str, value: Any) -> bool:
    return text == ("(none)" if value in (None, "") else str(value))


def check_cards(page: dict[str, Any], cards: dict[str, tuple[str, str]], answers: Any) -> int:
    assert set(page["cards"]) == set(cards)
    for card, (answer, path) in cards.items():
        value = at(answers[answer], path)
        assert same_number(page["cards"][card], value), (card, page["cards"][card], value)
    return len(cards)


def check_tables(
    page: dict[str, Any],
    tables: dict[str, tuple[str, dict[str, str], list[tuple[str, str]]]],
    api: Api,
    base: dict[str, str],
) -> int:
    """Each table against its view for ``base``; returns how many cells were compared."""
    compared = 0
    assert set(page["tables"]) == set(tables)
    for table, (view, extra, columns) in tables.items():
        shown = page["tables"][table]
        query = {**base, **extra, "limit": "10"}
        body = api.get(view, query)
        assert shown["headers"] == [h for h, _ in columns], table
        assert len(shown["rows"]) == len(body["rows"]), table
        for cells, row in zip(shown["rows"], body["rows"], strict=True):
            assert same_label(cells[0], at(row, columns[0][1])), (table, cells, row)
            for text, (header, path) in zip(cells[1:], columns[1:], strict=True):
                if path in ("server", "service"):
                    assert same_label(text, at(row, path)), (table, header)
                else:
                    assert same_number(text, at(row, path)), (table, header, text, at(row, path))
                compared += 1
        if body["total"] > len(body["rows"]):
            assert shown["more"] == f"{len(body['rows'])} of {body['total']} · "
        # Its CSV link asks the same view for up to 1000 rows.
        link = dict(parse_qsl(urlsplit(shown["links"][0]).query))
        assert urlsplit(shown["links"][0]).path == f"/analytics/{view}"
        assert link == {**query, "limit": "1000", "format": "csv"}, table
    return compared


def check_charts(
    page: dict[str, Any], points: list[dict[str, Any]], bars: dict[str, tuple[str, str]]
) -> int:
    """Bars and dots against the time series: one per interval with data, none for the others,
    heights in proportion, hover titles with the value. ``bars``: series -> (chart, path)."""
    want = {
        (chart, series, p["t"], at(p, path))
        for series, (chart, path) in bars.items()
        for p in points
        if at(p, path)
    }
    got = {(chart, series, t, v) for chart, series, t, v, _, _ in page["bars"]}
    assert got == want
    for chart in {c for c, *_ in page["bars"]}:
        scale = {round(h / v, 6) for c, _, _, v, h, _ in page["bars"] if c == chart}
        assert max(scale) - min(scale) < 1e-3, scale  # height in proportion to the value
    for _, _, t, v, _, title in page["bars"]:
        assert title.startswith(t) and same_number(title.rsplit(": ", 1)[1], v)
    latency = next(chart for chart, _ in bars.values()).replace("calls", "latency")
    dots = {
        (latency, q, p["t"], p["tool_calls"]["latency_ms"][q])
        for p in points
        for q in ("p50", "p95", "p99")
        if p["tool_calls"]["latency_ms"][q] is not None
    }
    assert {(c, q, t, v) for c, q, t, v, _, _ in page["dots"]} == dots
    for _, q, t, v, _, title in page["dots"]:
        assert title == f"{t} {q}: {v:,.1f} ms" or same_number(title.split(": ")[1], v)
    return len(page["bars"]) + len(page["dots"])


def check_view(
    page: dict[str, Any],
    api: Api,
    base: dict[str, str],
    cards: dict[str, tuple[str, str]],
    tables: dict[str, tuple[str, dict[str, str], list[tuple[str, str]]]],
    bars: dict[str, tuple[str, str]],
) -> tuple[Any, int, int]:
    """Cards, tables and charts of one view against the API for ``base``: (the summary, cards and
    cells compared, which are all of them, chart marks compared)."""
    summary = api.get("summary", base)
    compared = check_cards(page, cards, {"summary": summary})
    compared += check_tables(page, tables, api, base)
    assert compared == page["numbers"]  # every card and every table cell
    query = {**base, "resolution": "hour"}
    charted = check_charts(page, api.get("timeseries", query)["points"], bars)
    link = urlsplit(page["timeseries_link"])
    assert link.path == "/analytics/timeseries"
    assert dict(parse_qsl(link.query)) == {**query, "format": "csv"}
    return summary, compared, charted


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_every_number_on_the_page_is_the_apis(
    service: ServiceProcess, browser: Any, tmp_path: Path, width: int, height: int
) -> None:
    viewer = viewer_key(service)
    service.start()
    seed = make_seed(400)
    post(service, seed.metrics + handshakes(seed.now))
    api = Api(service, viewer)
    ui = Page(browser, service, width, height)
    ui.connect(viewer)
    page = ui.read()
    assert page["view"] == "overview"
    assert not ui.page.is_visible("#key-form") and ui.page.is_visible("#controls")
    base = {"since": page["since"], "until": page["until"]}
    summary, compared, charted = check_view(
        page,
        api,
        base,
        OVERVIEW_CARDS,
        OVERVIEW_TABLES,
        {
            "requests": ("chart-calls", "calls"),
            "calls": ("chart-calls", "tool_calls.calls"),
            "errors": ("chart-calls", "tool_calls.errors"),
        },
    )
    assert compared > 60 and charted > 100
    # The headline counts tool calls, as its own table does (issue 18: 59 vs 33).
    tools = api.get("tools", {**base, "limit": "1000"})["rows"]
    assert summary["tool_calls"]["calls"] == sum(r["calls"] for r in tools) < summary["calls"]
    assert page["cards"]["tool-calls"] == f"{sum(r['calls'] for r in tools):,}"
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways page
    ui.page.screenshot(path=str(tmp_path / f"overview-{width}.png"), full_page=True)

    # A click on a tool opens its own view: its calls, errors, latency, by client and by tenant.
    first = ui.page.locator("#tools tbody th a").first
    href = first.get_attribute("href")
    first.click()
    ui.page.wait_for_selector("#tool-view[data-range='7d']", timeout=LOAD_MS)
    assert not ui.page.is_visible("#overview")
    page = ui.read()
    only = dict(parse_qsl(href.removeprefix("#tool?")))
    assert only == {"tool": tools[0]["tool"], "server": tools[0]["server"], "service": "svc"}
    assert page["title"] == f"Tool {only['tool']} (server {only['server']}, service svc)"
    base = {"since": page["since"], "until": page["until"], **only}
    one, compared, charted = check_view(
        page,
        api,
        base,
        TOOL_CARDS,
        TOOL_TABLES,
        {
            "calls": ("tool-chart-calls", "tool_calls.calls"),
            "errors": ("tool-chart-calls", "tool_calls.errors"),
        },
    )
    assert one["tool_calls"]["calls"] == tools[0]["calls"]
    assert compared > 20 and charted > 20
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= width
    ui.page.screenshot(path=str(tmp_path / f"tool-{width}.png"), full_page=True)
    ui.page.click("#back")
    ui.page.wait_for_selector("#overview:not([hidden])", timeout=LOAD_MS)
    assert (tmp_path / f"overview-{width}.png").stat().st_size > 20_000
    assert ui.problems == []


def test_csv_links_download_what_the_api_exports(
    service: ServiceProcess, browser: Any, tmp_path: Path
) -> None:
    viewer = viewer_key(service)
    service.start()
    seed = make_seed(150)
    post(service, seed.metrics + handshakes(seed.now, 12))
    ui = Page(browser, service, 1280, 900)
    ui.connect(viewer)
    links = ui.page.locator("#overview a.csv")
    # The time series, seven tables, and tenants by tool (the billing export).
    assert links.count() == 9
    downloaded = []
    for i in range(links.count()):
        link = links.nth(i)
        href = link.get_attribute("href")
        assert href.startswith("/analytics/") and "format=csv" in href
        with ui.page.expect_download() as info:
            link.click()
        download = info.value
        assert download.suggested_filename == link.get_attribute("download")
        target = tmp_path / download.suggested_filename
        download.save_as(target)
        r = httpx.get(service.url + href, headers={"X-API-Key": viewer})
        assert r.status_code == 200
        assert target.read_bytes() == r.content and r.text.count("\r\n") >= 2, href
        downloaded.append(download.suggested_filename)
    assert len(set(downloaded)) == 9 and "tenants-by-tool.csv" in downloaded
    assert ui.problems == []


def test_latency_chart_draws_a_lone_interval_and_breaks_at_empty_ones(
    service: ServiceProcess, browser: Any, tmp_path: Path
) -> None:
    service.env["METRICS_API_KEY_OTHER"] = OTHER_KEY
    viewer = viewer_key(service)
    service.start()
    hour = 3600.0
    start_of_hour = time.time() // hour * hour

    def call(hours_ago: int, ms: float) -> dict[str, Any]:
        return {
            "type": "tool_execution",
            "timestamp": start_of_hour - hours_ago * hour + 1800,
            "duration_ms": ms,
            "dimensions": {
                "method": "tools/call",
                "tool_name": "search",
                "server_name": "srv-0",
                "client_name": "claude",
                "success": True,
            },
        }

    # service "svc": one interval alone, then two in a row, empty hours around them.
    post(service, [call(10, 40.0), call(5, 80.0), call(5, 90.0), call(4, 120.0)])
    # service "other": everything in one interval.
    post(service, [call(3, 25.0), call(3, 35.0)], key=OTHER_KEY)
    api = Api(service, viewer)

    ui = Page(browser, service, 1280, 900)
    ui.connect(viewer, "24h", service="svc")
    page = ui.read()
    points = api.get(
        "timeseries",
        {"since": page["since"], "until": page["until"], "service": "svc", "resolution": "hour"},
    )["points"]
    with_data = [p["t"] for p in points if p["tool_calls"]["calls"]]
    assert len(with_data) == 3
    for q in ("p50", "p95", "p99"):
        d = page["paths"][f"chart-latency {q}"]
        # Two runs: the lone interval (a move and nothing else) and the pair (a move, a line).
        assert d.count("M") == 2 and d.count("L") == 1, d
        assert sorted(t for _, qq, t, *_ in page["dots"] if qq == q) == with_data
    box = ui.page.locator("#chart-latency circle.point.p95").first.bounding_box()
    assert box is not None and box["width"] > 3 and box["height"] > 3
    assert len([b for b in page["bars"] if b[1] == "calls"]) == 3
    ui.page.screenshot(path=str(tmp_path / "gaps.png"), full_page=True)

    ui.page.fill("#service", "other")
    ui.page.dispatch_event("#service", "change")
    ui.page.wait_for_selector("#overview[data-service='other']", timeout=LOAD_MS)
    page = ui.read()
    assert {t for _, _, t, *_ in page["dots"]} == {
        p["t"]
        for p in api.get(
            "timeseries",
            {
                "since": page["since"],
                "until": page["until"],
                "service": "other",
                "resolution": "hour",
            },
        )["points"]
        if p["tool_calls"]["calls"]
    }
    assert len(page["dots"]) == 3  # one dot per percentile, in the only interval with data
    assert all(d.count("M") == 1 and "L" not in d for d in page["paths"].values())
    box = ui.page.locator("#chart-latency circle.point.p50").bounding_box()
    assert box is not None and box["width"] > 3
    ui.page.screenshot(path=str(tmp_path / "one-interval.png"), full_page=True)
    assert ui.problems == []


def test_overview_with_an_ingest_key_says_it_may_not(service: ServiceProcess, browser: Any) -> None:
    service.start()
    page = browser.new_page()
    page.goto(service.url + "/ui")
    page.fill("#key", INGEST_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])", timeout=LOAD_MS)
    assert "403" in page.text_content("#error")
    assert page.is_visible("#key-form") and page.evaluate("sessionStorage.length") == 0


def test_the_page_is_labelled_for_assistive_technology(
    service: ServiceProcess, browser: Any
) -> None:
    viewer = viewer_key(service)
    service.start()
    ui = Page(browser, service, 1280, 900)
    unlabelled = ui.page.evaluate(
        """() => [...document.querySelectorAll("input, select")]
             .filter((e) => !document.querySelector(`label[for="${e.id}"]`)).map((e) => e.id)"""
    )
    assert unlabelled == []
    ui.connect(viewer, "24h")
    report = ui.page.evaluate(
        """() => ({
          h1: document.querySelectorAll("h1").length,
          tables: [...document.querySelectorAll("#overview table")].map((t) => ({
            named: !!document.getElementById(t.getAttribute("aria-labelledby")),
            scoped: [...t.tHead.querySelectorAll("th")].every((th) => th.scope === "col"),
          })),
          charts: [...document.querySelectorAll("#overview svg")].map((s) =>
            s.getAttribute("role") === "img" && !!s.getAttribute("aria-label")),
          sections: [...document.querySelectorAll("#overview section")].map((s) =>
            !!(s.getAttribute("aria-label") || s.querySelector("h2"))),
        })"""
    )
    assert report["h1"] == 1
    assert len(report["tables"]) == 7 and all(t["named"] and t["scoped"] for t in report["tables"])
    assert report["charts"] == [True, True]
    assert report["sections"] and all(report["sections"])
    assert ui.problems == []
