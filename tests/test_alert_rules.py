"""The Prometheus alert rules: promtool accepts them, every rule's unit tests pass with a firing
and a quiet case, and removing any rule makes its unit tests fail (so each one is really tested).

That the rules only name metrics the service exports is proved against a real scrape in
``tests/test_dashboards.py``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._helpers import ROOT, require_binary

RULES = ROOT / "prometheus" / "rules" / "mcp-alerts.yml"
UNIT_TESTS = sorted((ROOT / "prometheus" / "rules" / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", "prometheus")
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    cases = []
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = rule_tests()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), names
    untested = {
        name: kinds
        for name in names
        if (
            kinds := {
                "firing": any(c["alertname"] == name and c.get("exp_alerts") for c in cases),
                "quiet": any(c["alertname"] == name and not c.get("exp_alerts") for c in cases),
            }
        )
        != {"firing": True, "quiet": True}
    }
    assert not untested, untested
    assert {c["alertname"] for c in cases} <= set(names)


def test_every_alert_has_a_severity_and_an_explanation() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@pytest.mark.parametrize("name", [rule["alert"] for rule in alerts()])
def test_unit_tests_fail_without_the_rule(name: str, tmp_path: Path) -> None:
    """A copy of the rules without ``name`` fails the unit tests, naming that alert."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["rules"] = [r for r in group["rules"] if r.get("alert") != name]
    rules_dir = tmp_path / "rules"
    (rules_dir / "tests").mkdir(parents=True)
    (rules_dir / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    copies = []
    for path in UNIT_TESTS:
        if f"alertname: {name}\n" in path.read_text():
            copies.append(shutil.copy(path, rules_dir / "tests" / path.name))
    result = promtool("test", "rules", *copies)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"alertname: {name}," in output, output


def test_the_migration_query_of_the_docs_is_the_one_promtool_checks() -> None:
    """docs/migrating.md's query across the `server` -> `server_name` rename is tested by
    prometheus/rules/tests/migration.yml (run with the other unit tests above)."""
    docs = (ROOT / "docs" / "migrating.md").read_text()
    [query] = re.findall(r"```promql\n(.*?)\n```", docs, re.S)
    doc = yaml.safe_load((ROOT / "prometheus" / "rules" / "tests" / "migration.yml").read_text())
    checked = [case["expr"] for test in doc["tests"] for case in test["promql_expr_test"]]
    assert checked.count(query) == 2, (query, checked)
