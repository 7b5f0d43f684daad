"""The documentation builds strictly, lists every setting, and the README stays a first-hour page.

`mkdocs build --strict` fails on a broken link or anchor, a page left out of the nav and a nav
entry without its page (mkdocs.yml's `validation`), so CI catches them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices

from metrics_service.settings import API_KEY_ENV_PREFIX, Settings
from tests._helpers import ROOT


def nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    return re.findall(r"^\s+- [^:\n]+: (\S+\.md)\s*$", text, re.MULTILINE)


def test_the_site_builds_strictly_with_every_page_in_the_nav(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="pip install -e '.[test]' (mkdocs is a test extra)")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pages = nav_pages()
    in_docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    # Every page of docs/ is in the nav, plus the README (home) and the client guide.
    assert in_docs | {"index.md", "middleware.md"} == set(pages)
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert built.is_file(), page
    home = (site / "index.html").read_text()
    # The README's links into docs/ and to the client guide point at pages of the site.
    assert 'href="operations/#a-new-keys-first-seconds"' in home
    assert 'href="middleware/"' in home
    assert "docs/api.md" not in home.replace("`docs/`", "")


def setting_env_names() -> dict[str, list[str]]:
    """Each field of Settings -> the environment variables that set it."""
    names: dict[str, list[str]] = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[name] = [str(c) for c in alias.choices]
        elif isinstance(alias, str):
            names[name] = [alias]
        else:
            names[name] = [(info.alias or name).upper()]
    return names


def test_every_setting_is_in_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        f"{field} ({var})"
        for field, variables in setting_env_names().items()
        for var in variables
        if f"`{var}`" not in page
    ]
    assert not missing, f"add to docs/configuration.md: {missing}"
    assert f"`{API_KEY_ENV_PREFIX}<NAME>`" in page
    # And nothing there that is not a setting (a renamed variable would linger).
    documented = set(re.findall(r"^\| `((?:METRICS|OTEL|SQLITE)_[A-Z0-9_]+)`", page, re.M))
    known = {v for vs in setting_env_names().values() for v in vs}
    assert documented <= known, documented - known


def test_the_readme_is_a_first_hour_page() -> None:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    # A first-hour page: its performance section holds two small tables (issue 19), the rest
    # lives in docs/.
    assert len(lines) < 275, len(lines)
    # The two set-up commands, on the first screen, in the first code block.
    first = text.index("```sh")
    block = text[first : text.index("```", first + 5)]
    assert text[:first].count("\n") < 20
    commands = [ln.split("#")[0].strip() for ln in block.splitlines()[1:] if ln.strip()]
    assert commands == ["./scripts/serve", "./scripts/test"]
    for script in ("serve", "test"):
        assert (ROOT / "scripts" / script).stat().st_mode & 0o111
    assert "9465" in text and "OTEL_PROMETHEUS_PORT" in text and "METRICS_SERVICE_PORT" in text
    # One command form: the service's CLI is always .venv/bin/metrics-service outside Docker.
    for ln in lines:
        for m in re.finditer(r"(\S*)metrics-service (serve|keys|db|report|retention)\b", ln):
            assert m.group(1).endswith(".venv/bin/") or "docker" in ln, ln
    for doc in ["middleware/README.md", *(f"docs/{p}" for p in nav_pages() if p != "index.md")]:
        if doc != "docs/middleware.md":
            assert f"]({doc}" in text or doc.endswith("index.md"), f"README does not link {doc}"
