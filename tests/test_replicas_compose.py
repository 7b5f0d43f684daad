"""docker/compose.scaled.yaml without a Docker engine: it parses, HAProxy accepts its config and
sends to every replica on the service's port, Prometheus (promtool) accepts its config and
scrapes every replica's endpoint, the replicas' environment is the service's own settings with
PostgreSQL and Redis, and everything mounted exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from metrics_service.settings import API_KEY_ENV_PREFIX, env_names, load_settings
from tests._helpers import ROOT, require_binary

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.scaled.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
REPLICAS = sorted(name for name in SERVICES if name.startswith("metrics-"))
SECRETS = {"POSTGRES_PASSWORD": "pw", "METRICS_INGEST_KEY": "k" * 32, "METRICS_ADMIN_KEY": "a" * 32}


def _substituted(value: str) -> str:
    """``${NAME:?message}`` and ``${NAME:-default}`` as compose fills them from SECRETS."""

    def fill(match: re.Match[str]) -> str:
        name, _, rest = match.group(1).partition(":")
        return SECRETS.get(name, rest[1:] if rest.startswith("-") else "")

    return re.sub(r"\$\{([^}]+)\}", fill, value)


def replica_env(name: str) -> dict[str, str]:
    return {k: _substituted(str(v)) for k, v in SERVICES[name]["environment"].items()}


def test_three_replicas_postgres_redis_haproxy_prometheus_grafana() -> None:
    assert len(REPLICAS) == 3
    assert {"postgres", "redis", "haproxy", "prometheus", "grafana"} <= set(SERVICES)
    for name in REPLICAS:
        assert "ports" not in SERVICES[name], "replicas are reached through HAProxy only"
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_config_is_valid() -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose not installed: apt-get install -y docker-compose")
    result = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **SECRETS},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_replica_environment_is_the_services_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    known = set(env_names().values())
    for name in REPLICAS:
        env = replica_env(name)
        for variable in env:
            assert variable in known or variable.startswith(API_KEY_ENV_PREFIX), variable
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = load_settings()  # a bad value would raise, naming the variable
        assert env["METRICS_DATABASE_URL"].startswith("postgresql://metrics:pw@postgres:5432/")
        assert settings.rate_limit_storage_uri == "redis://redis:6379"
        assert settings.port == 8890 and settings.otel_prometheus_port == 9465


def test_haproxy_accepts_the_config_and_balances_every_replica() -> None:
    haproxy = require_binary("haproxy", "haproxy")
    config = DOCKER / "haproxy.cfg"
    result = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    servers = re.findall(r"^\s*server (\S+) (\S+)", config.read_text(), re.M)
    assert sorted(address for _, address in servers) == [f"{r}:8890" for r in REPLICAS]
    assert "option httpchk GET /ready" in config.read_text()
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in SERVICES["haproxy"]["volumes"]


def test_prometheus_scrapes_every_replica() -> None:
    promtool = require_binary("promtool", "prometheus")
    command = SERVICES["prometheus"]["command"]
    config_in_container = next(a for a in command if a.startswith("--config.file=")).split("=")[1]
    mount = next(v for v in SERVICES["prometheus"]["volumes"] if v.endswith(":/etc/prometheus:ro"))
    host = (DOCKER / mount.split(":")[0]).resolve() / Path(config_in_container).name
    result = subprocess.run(
        [promtool, "check", "config", str(host)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(host.read_text())["scrape_configs"]}
    targets = jobs["mcp-metrics-service"]["static_configs"][0]["targets"]
    assert targets == [f"{r}:9465" for r in REPLICAS]


def test_everything_mounted_exists() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for spec in service.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), (name, source)
            else:
                assert source in declared, (name, source)
