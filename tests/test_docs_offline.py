"""``/docs`` works without internet: a wheel built from the tree ships Swagger UI (and the overview
page), and the service installed from it, in a fresh venv, renders every operation of its
OpenAPI schema in a real Chromium whose requests to anywhere but the service are refused."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from metrics_service.analytics.routes import DOCS_CSP
from tests._helpers import ADMIN_KEY, INGEST_KEY, ROOT, ServiceProcess

SHIPPED = [
    "metrics_service/ui/docs.html",
    "metrics_service/ui/docs.js",
    "metrics_service/ui/index.html",
    "metrics_service/ui/app.js",
    "metrics_service/ui/app.css",
    "metrics_service/ui/swagger-ui/swagger-ui-bundle.js",
    "metrics_service/ui/swagger-ui/swagger-ui.css",
    "metrics_service/ui/swagger-ui/LICENSE",
    "metrics_service/ui/swagger-ui/NOTICE",
]
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from the tree; its dependencies are this venv's (a
    path entry, so this venv's editable install of the service is not seen there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No matching distribution" in built.stderr:
        pytest.skip("cannot fetch the build backend (setuptools) for pip wheel")
    assert built.returncode == 0, built.stderr
    [wheel] = tmp.glob("mcp_metrics_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in SHIPPED if n not in names] == []
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = subprocess.run(
        [sys.executable, "-c", "import fastapi, os; print(os.path.dirname(fastapi.__path__[0]))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # a wheel is a zip of the site-packages tree
    Path(site, "deps.pth").write_text(deps + "\n")
    where = subprocess.run(
        [str(python), "-c", "import metrics_service; print(metrics_service.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp,
        check=True,
    ).stdout.strip()
    assert where.startswith(site), where  # the wheel's copy, not the work tree's
    return python


def test_docs_render_every_operation_with_the_network_closed(
    installed: Path, browser: Any, tmp_path: Path
) -> None:
    service = ServiceProcess(
        db_path=tmp_path / "m.db",
        env={"METRICS_API_KEY_SVC": INGEST_KEY, "METRICS_ADMIN_API_KEY": ADMIN_KEY},
        log_path=tmp_path / "service.log",
        python=str(installed),
    )
    try:
        service.start()
        schema = httpx.get(service.url + "/openapi.json").json()
        operations = sum(1 for item in schema["paths"].values() for m in item if m in METHODS)
        assert operations > 10

        context = browser.new_context()
        refused: list[str] = []

        def gate(route: Any) -> None:
            if route.request.url.startswith(service.url + "/"):
                route.continue_()
            else:
                refused.append(route.request.url)
                route.abort("internetdisconnected")

        context.route("**/*", gate)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        response = page.goto(service.url + "/docs")
        assert response.status == 200
        assert response.headers["content-security-policy"] == DOCS_CSP
        page.wait_for_selector(".opblock", timeout=20_000)
        assert page.locator(".opblock").count() == operations
        assert schema["info"]["title"] in page.locator(".info .title").text_content()
        # An operation opens with its parameters, drawn from the schema.
        page.locator(".opblock-get .opblock-summary", has_text="/analytics/summary").click()
        page.wait_for_selector(".opblock.is-open .parameters", timeout=10_000)
        assert page.locator(".opblock.is-open .parameters tr[data-param-name]").count() >= 9
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)
        assert refused == [] and problems == []
        # The overview page's own files come from the wheel too.
        for asset in ("/ui", "/ui/app.js", "/ui/app.css", "/ui/swagger-ui/swagger-ui.css"):
            assert httpx.get(service.url + asset).status_code == 200, asset
        assert httpx.get(service.url + "/ui/swagger-ui/LICENSE").status_code == 404
        assert httpx.get(service.url + "/redoc").status_code == 404
    finally:
        service.stop()
