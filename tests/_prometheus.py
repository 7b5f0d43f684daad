"""A real Prometheus server for tests: scrapes given targets every second on a free loopback port.

Usage::

    with start_prometheus(tmp_path, ["127.0.0.1:9465"]) as prom:
        prom.wait_for_series('up{job="target"} == 1')
        prom.query("rate(mcp_auth_requests_total[1m])")
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests._helpers import ServiceProcess, free_port, require_binary, wait_for

JOB = "target"


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (at unix time ``at``, default now); the result as the HTTP API returns it
        (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        r = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def values(self, promql: str, at: float | None = None) -> list[float]:
        """The sample values of an instant query (NaN kept: an empty histogram quantile is NaN)."""
        return [float(s["value"][1]) for s in self.query(promql, at)]

    def value(self, promql: str, at: float | None = None) -> float | None:
        """The one value of a query that yields at most one series (None: no series, or NaN)."""
        vals = self.values(promql, at)
        assert len(vals) <= 1, (promql, vals)
        return vals[0] if vals and not math.isnan(vals[0]) else None

    def wait_for_series(self, promql: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns at least one series; fail after ``timeout_s``."""
        try:
            return wait_for(lambda: self.query(promql), timeout_s, 0.2)  # type: ignore[no-any-return]
        except AssertionError as exc:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"][
                "activeTargets"
            ]
            health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
            raise AssertionError(
                f"no series for {promql!r} within {timeout_s} s; targets: {health}"
            ) from exc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape(url: str) -> str:
    """The text exposition at ``url`` (an exporter's ``/metrics``), as Prometheus would fetch it."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, (url, r.status_code)
    return r.text


Sample = tuple[str, frozenset[tuple[str, str]]]


def parse_samples(text: str) -> dict[Sample, float]:
    """Parse the text format with prometheus_client's parser: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def write_config(path: Path, targets: list[str]) -> None:
    # JSON is YAML, so no YAML library is needed. scrape_timeout may not exceed scrape_interval.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }
    path.write_text(json.dumps(config, indent=2))


@contextmanager
def start_prometheus(
    workdir: Path, targets: list[str], *, port: int | None = None
) -> Iterator[Prometheus]:
    """Run ``prometheus`` scraping ``targets`` (``host:port``, path ``/metrics``) as job "target".

    Skips the test when the binary is missing. ``port`` lets a test name Prometheus's own address
    among the targets.
    """
    binary = require_binary("prometheus", "prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = workdir / "prometheus.yml"
    write_config(config, targets)
    with open(workdir / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    prom = Prometheus(port, proc, workdir)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{prom.log()}")
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 20, 0.05)
        yield prom
    finally:
        prom.stop()


@dataclass
class ScrapedService:
    service: ServiceProcess
    prom: Prometheus
    exporter_url: str  # the service's own Prometheus endpoint, ``.../metrics``


@contextmanager
def scraped_service(workdir: Path, env: dict[str, str]) -> Iterator[ScrapedService]:
    """A real service process (settings ``env``) with its Prometheus endpoint on a free port,
    scraped every second by a real Prometheus. Skips the test when Prometheus is missing."""
    require_binary("prometheus", "prometheus")
    service = ServiceProcess(db_path=workdir / "m.db", log_path=workdir / "service.log", env=env)
    try:
        service.start()
        exporter_port = service.prometheus_port
        with start_prometheus(workdir / "prom", [f"127.0.0.1:{exporter_port}"]) as prom:
            yield ScrapedService(service, prom, f"http://127.0.0.1:{exporter_port}/metrics")
    finally:
        service.stop()
