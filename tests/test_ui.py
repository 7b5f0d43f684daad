"""The overview page in a real headless Chromium: it loads with no console error, shows the
seeded numbers once given a viewer key, and a screenshot is taken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from metrics_service import auth, storage
from tests._analytics_seed import make_seed
from tests._helpers import INGEST_KEY, ServiceProcess, require_binary

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Any:
    binary = require_binary("chromium", "chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no `playwright install`)"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_overview_shows_the_seeded_numbers(
    service: ServiceProcess, browser: Any, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    conn, _ = storage.open_database(service.db_path)
    viewer, _ = auth.create_key(conn, service=None, role="viewer", source="cli")
    conn.close()
    service.start()
    seed = make_seed(400)
    r = httpx.post(
        service.url + "/metrics",
        json={"service": "svc", "version": "1", "metrics": seed.metrics},
        headers={"X-API-Key": INGEST_KEY},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["accepted"] == len(seed.metrics)
    calls = seed.tools()
    users = {m["dimensions"]["user_hash"] for m in seed.of("auth_request")}

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    response = page.goto(service.url + "/ui")
    assert (
        response.status == 200
        and "default-src 'none'" in response.headers["content-security-policy"]
    )
    page.fill("#key", viewer)
    page.click("#key-form button[type=submit]")
    page.select_option("#range", "7d")
    expected = f"{len(calls):,}"
    # Locator assertions poll outside the page, so the page's CSP (no eval) does not get in the way.
    sync_api.expect(page.locator("#calls")).to_have_text(expected, timeout=15_000)
    assert not page.is_visible("#key-form") and page.is_visible("#controls")
    assert page.text_content("#users") == str(len(users))
    assert page.text_content("#clients") == "2"
    assert page.text_content("#p95").endswith(" ms")
    tools = page.locator("#top-tools tbody tr")
    assert tools.count() == 3
    assert {tools.nth(i).locator("td").first.text_content() for i in range(3)} == {
        "search",
        "fetch",
        "write",
    }
    assert page.locator("#top-clients tbody tr").count() == 2
    assert page.locator("#chart-calls svg rect.bar.calls").count() > 0
    assert page.locator("#chart-latency svg path.line.p95").count() == 1
    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0
    shot = tmp_path / "overview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert problems == []


def test_overview_with_an_ingest_key_says_it_may_not(service: ServiceProcess, browser: Any) -> None:
    service.start()
    page = browser.new_page()
    page.goto(service.url + "/ui")
    page.fill("#key", INGEST_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])", timeout=15_000)
    assert "403" in page.text_content("#error")
    assert page.is_visible("#key-form") and page.evaluate("sessionStorage.length") == 0
