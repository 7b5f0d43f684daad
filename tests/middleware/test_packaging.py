"""The client distribution has every module its README documents. Under scripts/test-installed
(MIDDLEWARE_TEST_INSTALLED=1) the same checks run against the wheel installed in a fresh venv,
and this file first proves that the modules really come from that install, not the tree."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "middleware" / "README.md"
TREE = README.parent / "mcp_metrics"
INSTALLED = os.environ.get("MIDDLEWARE_TEST_INSTALLED") == "1"


def _documented() -> dict[str, set[str]]:
    """module -> names, from the README's ``from mcp_metrics... import`` and ``python -m`` lines."""
    text = README.read_text()
    modules: dict[str, set[str]] = {}
    for m in re.finditer(r"^from (mcp_metrics[\w.]*) import ([\w, ]+)", text, re.M):
        modules.setdefault(m.group(1), set()).update(n.strip() for n in m.group(2).split(","))
    for m in re.finditer(r"python -m (mcp_metrics[\w.]*)", text):
        modules.setdefault(m.group(1), set())
    return modules


def test_the_readme_documents_the_mcp_launcher_and_the_public_names() -> None:
    documented = _documented()
    assert "mcp_metrics.mcp" in documented
    assert {"MetricsClient", "instrument_server", "track_tool"} <= documented["mcp_metrics"]


@pytest.mark.parametrize("module", sorted(_documented()))
def test_every_documented_module_imports(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [n for n in _documented()[module] if not hasattr(imported, n)]
    assert not missing, f"{module} lacks {missing}"


def test_every_package_of_the_tree_is_installed() -> None:
    """Each folder of mcp_metrics/ with an __init__.py is a package of the distribution."""
    packages = sorted(
        ".".join(("mcp_metrics", *p.parent.relative_to(TREE).parts))
        for p in TREE.rglob("__init__.py")
    )
    assert "mcp_metrics.mcp" in packages
    for package in packages:
        importlib.import_module(package)


def test_the_launcher_runs_as_documented() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mcp_metrics.mcp", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=README.parent.parent.parent,  # not the tree's middleware/ folder
    )
    assert out.returncode == 0, out.stderr
    assert "--transport" in out.stdout


@pytest.mark.skipif(not INSTALLED, reason="only under scripts/test-installed")
def test_the_modules_come_from_the_installed_wheel_not_the_tree() -> None:
    import mcp_metrics
    import mcp_metrics.mcp

    for module in (mcp_metrics, mcp_metrics.mcp):
        path = Path(module.__file__ or "").resolve()
        assert "site-packages" in path.parts, path
        assert not path.is_relative_to(TREE), path
    direct_url = subprocess.run(
        [sys.executable, "-m", "pip", "show", "-f", "mcp-metrics-client"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "Editable project location" not in direct_url
    assert "mcp_metrics/mcp/__init__.py" in direct_url
