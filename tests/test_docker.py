"""docker/ without a Docker engine: promtool accepts the Prometheus config and finds its rules, the
compose file parses and everything it mounts exists, ports and environment names are the service's
own settings and agree across the stack, and the image installs the project as scripts/serve does
from files that are enough to build it."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from metrics_service.settings import API_KEY_ENV_PREFIX, Settings, env_names, load_settings
from tests._helpers import ROOT, require_binary

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SERVICE_ENV: dict[str, str] = {
    k: str(v) for k, v in SERVICES["metrics-service"]["environment"].items()
}


def mounts(service: str) -> dict[str, str]:
    """Container path -> host path (resolved) or named volume, for one compose service."""
    result = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target = spec.split(":")[:2]
        result[target] = (
            str((DOCKER / source).resolve()) if source.startswith((".", "/")) else source
        )
    return result


def container_ports(service: str) -> set[int]:
    return {int(str(p).rsplit(":", 1)[1].split("/")[0]) for p in SERVICES[service].get("ports", [])}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instr, args in dockerfile():
        if instr == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(args)))
    return env


# -- Prometheus -----------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_finds_the_rules() -> None:
    result = subprocess.run(
        [require_binary("promtool", "prometheus"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output
    assert "rules/mcp-alerts.yml" in output and "rules/tests" not in output


def test_prometheus_scrapes_the_service_where_compose_runs_it() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [target] = jobs["mcp-metrics-service"]["static_configs"][0]["targets"]
    assert target == f"metrics-service:{SERVICE_ENV['OTEL_PROMETHEUS_PORT']}"
    # The job the alert rules select.
    rules = (ROOT / "prometheus" / "rules" / "mcp-alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', rules)) == {"mcp-metrics-service"}
    # Mounted where --config.file points, with the rules beside it.
    prom = SERVICES["prometheus"]
    [config_file] = [a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file=")]
    assert mounts("prometheus")[str(Path(config_file).parent)] == str(PROMETHEUS_CONFIG.parent)
    assert 9090 in container_ports("prometheus")
    assert not any(a.startswith("--web.listen-address") for a in prom["command"])


# -- compose --------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose: apt-get install -y docker-compose "
            "(the YAML tests below still check the file)"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_four_parts() -> None:
    assert set(SERVICES) == {"metrics-service", "prometheus", "grafana", "otel-collector"}
    build = SERVICES["metrics-service"]["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_everything_compose_mounts_exists() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("/"):
                assert Path(source).exists(), (name, source)
                assert Path(source).is_relative_to(ROOT), (name, source)
            else:
                assert source in declared, (name, source, target)


def test_service_environment_is_the_services_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    known = set(env_names().values())
    for name in SERVICE_ENV:
        assert name in known or name.startswith(API_KEY_ENV_PREFIX), name
    for name, value in SERVICE_ENV.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()  # a bad value would raise, naming the variable
    assert settings.host == "0.0.0.0" and settings.otel_prometheus_host == "0.0.0.0"
    assert {settings.port, settings.otel_prometheus_port} <= container_ports("metrics-service")
    assert mounts("metrics-service")[str(settings.db_path.parent)] == "metrics-data"


def test_otlp_goes_to_the_collector() -> None:
    endpoint = urlsplit(SERVICE_ENV["OTEL_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector"
    assert SERVICE_ENV["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    collector = SERVICES["otel-collector"]
    [config_path] = [a.split("=", 1)[1] for a in collector["command"] if a.startswith("--config=")]
    config_file = Path(mounts("otel-collector")[config_path])
    config = yaml.safe_load(config_file.read_text())
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http == f"0.0.0.0:{endpoint.port}"
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    assert set(pipeline["exporters"]) == {"prometheus", "debug"} == set(config["exporters"])
    assert set(pipeline.get("processors", [])) <= set(config.get("processors") or {})
    exporter_port = int(config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    assert {endpoint.port, exporter_port} <= container_ports("otel-collector")
    # The vendor examples of the seed, ready to uncomment.
    text = config_file.read_text()
    for example in (
        "# datadog:",
        "key: ${env:DD_API_KEY}",
        "# otlp/newrelic:",
        "api-key: ${env:NEW_RELIC_LICENSE_KEY}",
    ):
        assert example in text, example


def test_grafana_loads_the_provisioning_and_dashboards() -> None:
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == str(ROOT / "grafana" / "provisioning")
    provider = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )["providers"][0]
    dashboards = Path(grafana[provider["options"]["path"]])
    assert dashboards == ROOT / "grafana" / "dashboards"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(provider["options"]["path"])).is_file()
    source = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert urlsplit(source["url"]).netloc == "prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    assert 3000 in container_ports("grafana")


def test_grafana_image_matches_the_dashboard_schema() -> None:
    """The dashboards are validated against the types of the Grafana version compose runs."""
    tag = SERVICES["grafana"]["image"].split(":", 1)[1]
    schema = json.loads((ROOT / "grafana" / "schema" / "dashboard.schema.json").read_text())
    assert schema["x-grafana-schema-package"] == tag
    script = (ROOT / "scripts" / "generate-dashboard-schema").read_text()
    assert f"GRAFANA_SCHEMA_VERSION=${{GRAFANA_SCHEMA_VERSION:-{tag}}}" in script


# -- the image ------------------------------------------------------------------------------


def test_image_is_multi_stage_non_root_with_a_health_check() -> None:
    steps = dockerfile()
    stages = [args for instr, args in steps if instr == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith(" AS build")
    assert any(i == "COPY" and a.startswith("--from=build ") for i, a in steps)
    [user] = [a for i, a in steps if i == "USER"]
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert user not in {"root", "0"}
    assert re.search(rf"useradd [^&]*--uid [1-9][0-9]*[^&]* {user}\b", runs), runs
    [health] = [a for i, a in steps if i == "HEALTHCHECK"]
    assert "CMD" in health and re.search(r"/(ready|health)\b", health)
    assert "METRICS_SERVICE_PORT" in health


def test_image_settings_are_the_services() -> None:
    env = dockerfile_env()
    known = set(env_names().values())
    ours = {k: v for k, v in env.items() if k.startswith(("METRICS_", "SQLITE_", "OTEL_"))}
    assert set(ours) <= known, set(ours) - known
    assert ours["METRICS_SERVICE_HOST"] == "0.0.0.0" and ours["OTEL_PROMETHEUS_HOST"] == "0.0.0.0"
    [volume] = [json.loads(a) for i, a in dockerfile() if i == "VOLUME"]
    assert volume == ["/var/lib/metrics"]
    assert Path(ours["SQLITE_DB_PATH"]).parent == Path(volume[0])
    exposed = {int(p) for i, a in dockerfile() if i == "EXPOSE" for p in a.split()}
    assert exposed == {int(ours["METRICS_SERVICE_PORT"]), int(ours["OTEL_PROMETHEUS_PORT"])}
    assert exposed == {
        Settings.model_fields["port"].default,
        Settings.model_fields["otel_prometheus_port"].default,
    }
    [cmd] = [json.loads(a) for i, a in dockerfile() if i == "CMD"]
    assert cmd[:2] == ["metrics-service", "serve"]


def test_image_installs_the_project_as_scripts_serve_does(tmp_path: Path) -> None:
    """`pip install .` (the project scripts/serve installs, there editable so that a git pull
    takes effect), from the files the image copies, which the .dockerignore lets through and
    which are enough to build the project with every module."""
    assert "ensure_serve_venv" in (ROOT / "scripts" / "serve").read_text()
    venv = (ROOT / "scripts" / "_venv.sh").read_text()
    serve_venv = venv[venv.index("ensure_serve_venv() {") :]
    [serve_args] = re.findall(r"^    ensure_venv \.venv (.+)$", serve_venv, re.M)
    assert shlex.split(serve_args) == ["-e", "."]
    steps = dockerfile()
    build = steps[: [i for i, (instr, _) in enumerate(steps) if instr == "FROM"][1]]
    assert ("RUN", "pip install .") in build
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    context = tmp_path / "context"
    context.mkdir()
    for instr, args in build:
        if instr == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert any(fnmatch.fnmatch(source.rstrip("/"), p) for p in allowed), source
                src = ROOT / source
                copy = shutil.copytree if src.is_dir() else shutil.copy
                copy(src, context / source)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import build_meta; print(build_meta.build_sdist('dist'))",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sdist = context / "dist" / result.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
        entry_points = next(m for m in tar.getmembers() if m.name.endswith("entry_points.txt"))
        scripts = tar.extractfile(entry_points).read().decode()  # type: ignore[union-attr]
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "metrics_service").rglob("*.py")}
    assert modules <= names, modules - names
    assert "metrics-service = metrics_service.cli:main" in scripts
