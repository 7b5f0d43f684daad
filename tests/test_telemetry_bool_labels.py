"""``METRICS_OTEL_BOOL_LABELS``: ``success`` (and ``healthy`` of the health checks) exported as
``true``/``false`` by default and as ``True``/``False`` when capitalized (dashboards built on the
pinned reference filter on those)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics_service import Settings, create_app
from metrics_service.settings import BoolLabels
from tests._helpers import INGEST_KEY, auth_event, payload, tool_event
from tests._traffic import health
from tests.test_telemetry import scrape


@pytest.mark.parametrize(
    ("mode", "yes", "no"),
    [(BoolLabels.lowercase, "true", "false"), (BoolLabels.capitalized, "True", "False")],
)
def test_success_labels_follow_the_setting(
    tmp_path: Path, keyed_env: None, mode: BoolLabels, yes: str, no: str
) -> None:
    settings = Settings(db_path=tmp_path / "m.db", otel_bool_labels=mode)
    with TestClient(create_app(settings)) as c:
        events = [tool_event("a", True), tool_event("a", False), auth_event(True)]
        events += [health(healthy=True), health(healthy=False, status_code=503)]
        r = c.post("/metrics", json=payload(metrics=events), headers={"X-API-Key": INGEST_KEY})
        assert r.status_code == 200 and r.json()["accepted"] == 5, r.text
        samples = scrape(c)
    for name in ("mcp_tool_executions_total", "mcp_auth_requests_total"):
        values = {dict(labels).get("success") for labels in samples[name]}
        assert yes in values, (name, values)
        assert not values & {"true", "false", "True", "False"} - {yes, no}, (name, values)
    tools = {
        dict(labels)["success"]: v for labels, v in samples["mcp_tool_executions_total"].items()
    }
    assert tools[yes] == 1 and tools[no] == 1
    checks = {
        dict(labels)["healthy"]: v for labels, v in samples["mcp_health_checks_total"].items()
    }
    assert checks == {yes: 1, no: 1}
