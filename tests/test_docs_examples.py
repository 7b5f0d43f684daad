"""The examples of README.md, docs/*.md and middleware/README.md, run for real.

A fenced block is marked by an HTML comment on the line just before its opening fence
(invisible on GitHub and on the site); docs/development.md documents the markers for writers:

    <!-- test: run -->                  sh: run with bash (set -euo pipefail) against a service
                                        started for the page; every curl must get a 2xx (curl runs
                                        with --fail-with-body); variables it exports are seen by
                                        the page's later blocks
    <!-- test: request METHOD PATH key=ingest|viewer|admin|none [status=N] -->
                                        json: sent as the request body; the status must be N
                                        (default 200); POST /metrics with no `response` block
                                        after it must have nothing rejected
    <!-- test: response -->             json or text: matches the output of the block before it
                                        (the stdout of a `run`, the body of a `request`): every
                                        key shown is there with the value shown; "..." matches
                                        anything, "abc..." any string starting with abc
    <!-- test: file NAME -->            any: written to NAME in the page's working directory
    <!-- test: mcp-client-config -->    json: an MCP client's `mcpServers` entry, started as the
                                        client starts it (with its `env` only, over stdio); each
                                        server's first tool is called and the call must be stored
    <!-- test: json --> / <!-- test: yaml -->   must parse
    <!-- test: compose -->              sh with Docker commands: `bash -n`, and every file named
                                        with -f exists (tests/test_docker.py checks the file)
    <!-- test: skip (reason) -->        not run: starts a service in the foreground, deletes data,
                                        needs the network...

Every block, marked or not, gets the static check of its language: sh/bash `bash -n`, json and
yaml parsed, python compiled. The examples are written for the defaults; a page's blocks run in
a scratch directory that has `.venv` (this interpreter's venv) linked in and `data/metrics.db` as
the service's database, `127.0.0.1:8890` and `127.0.0.1:9465` replaced by the service's free
ports, `METRICS_KEY` set to the key its first start printed (`--first-run-key my-service`, as
./scripts/serve does) and `METRICS_ADMIN_API_KEY` to its admin key. In an MCP client
configuration, `/path/to/mcp-metrics-service/` and `/path/to/` stand for that directory and a
key value ending in "..." for `METRICS_KEY`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests._helpers import ROOT, ServiceProcess, db_rows, free_port, require_binary, wait_for

DOC_FILES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "middleware" / "README.md",
]
KINDS = {"run", "request", "response", "file", "mcp-client-config", "json", "yaml", "compose"}
SHELL = {"sh", "bash", "shell", "console"}
RUNNABLE = {"run", "request", "file", "mcp-client-config"}
ADMIN_KEY = "mcpm_docs-admin-key-0123456789abcdefghijklmno"

_MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<marker>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # the text after "test:", None without a marker

    @property
    def kind(self) -> str | None:
        return self.marker.split()[0] if self.marker else None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            marker = _MARKER.match(lines[i])
            if marker and not (i + 1 < len(lines) and _FENCE.match(lines[i + 1])):
                raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a marker with no block")
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        before = _MARKER.match(lines[i - 1]) if i else None
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(
            rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]
        ):
            body.append(lines[j].removeprefix(indent))
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code block")
        code = "\n".join(body) + "\n"
        blocks.append(
            Block(path, i + 1, opening["info"].lower(), code, before["marker"] if before else None)
        )
        i = j + 1
    return blocks


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_every_block_passes_the_check_of_its_language(path: Path) -> None:
    bash = shutil.which("bash") or "/bin/bash"
    blocks = parse_blocks(path)
    for block in blocks:
        if block.kind is not None:
            assert block.kind in KINDS | {"skip"}, f"{block.where}: unknown marker {block.marker!r}"
        if block.kind == "response":
            continue  # an answer, checked against the real one where it is run
        if block.lang in SHELL:
            done = subprocess.run([bash, "-n"], input=block.code, capture_output=True, text=True)
            assert done.returncode == 0, f"{block.where}: {done.stderr}"
        elif block.lang == "json":
            try:
                document = json.loads(block.code)
            except ValueError as exc:
                raise AssertionError(f"{block.where}: not valid JSON ({exc})") from None
            # A body for POST /metrics is sent to the service, not only parsed.
            if isinstance(document, dict) and {"service", "metrics"} <= set(document):
                assert block.kind in {"request", "skip"}, f"{block.where}: mark it `request`"
        elif block.lang in {"yaml", "yml"}:
            yaml.safe_load(block.code)
        elif block.lang in {"python", "py"}:
            compile(block.code, block.where, "exec")
        if block.kind in {"json", "request", "mcp-client-config"}:
            assert block.lang == "json", f"{block.where}: a {block.kind} block must be json"
        if block.kind in {"run", "compose"}:
            assert block.lang in SHELL, f"{block.where}: a {block.kind} block must be sh"


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_docker_examples_name_files_that_exist(path: Path) -> None:
    for block in parse_blocks(path):
        if block.kind != "compose":
            continue
        words = shlex.split(block.code, comments=True)
        assert words[0] == "docker", block.where
        for flag, value in itertools.pairwise(words):
            if flag == "-f":
                assert (ROOT / value).is_file(), f"{block.where}: no file {value}"


# --- running the examples ---------------------------------------------------------------------


@dataclass
class Page:
    """A page's service and working directory, and what its blocks left behind."""

    workdir: Path
    service: ServiceProcess
    prometheus_port: int
    env: dict[str, str]
    state: Path
    ingest_key: str
    viewer_key: str | None = None
    output: str | None = None  # of the last run or request, for a response block
    checked: bool = True  # whether that output was matched by a response block
    notes: list[str] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        return text.replace("127.0.0.1:8890", f"127.0.0.1:{self.service.port}").replace(
            "127.0.0.1:9465", f"127.0.0.1:{self.prometheus_port}"
        )

    def key(self, role: str) -> str | None:
        if role == "ingest":
            return self.ingest_key
        if role == "admin":
            return ADMIN_KEY
        if role == "viewer":
            if self.viewer_key is None:
                r = httpx.post(
                    self.service.url + "/admin/keys",
                    json={"role": "viewer"},
                    headers={"X-API-Key": ADMIN_KEY},
                )
                assert r.status_code == 201, r.text
                self.viewer_key = str(r.json()["key"])
            return self.viewer_key
        assert role == "none", role
        return None


@pytest.fixture
def page_env(tmp_path: Path) -> Iterator[Page]:
    real_curl = require_binary("curl", "curl")
    workdir = tmp_path / "work"
    (workdir / "data").mkdir(parents=True)
    (workdir / ".venv").symlink_to(Path(sys.prefix))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "curl"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(real_curl)} --fail-with-body "$@"\n')
    wrapper.chmod(0o755)
    prometheus_port = free_port()
    service = ServiceProcess(
        db_path=workdir / "data" / "metrics.db",
        env={
            "METRICS_ADMIN_API_KEY": ADMIN_KEY,
            "OTEL_PROMETHEUS_PORT": str(prometheus_port),
        },
        log_path=tmp_path / "service.log",
        args=["--first-run-key", "my-service"],
    )
    service.start()
    try:
        found = re.search(r"export METRICS_KEY=(mcpm_\S+)", service.log())
        assert found, service.log()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("METRICS_", "SQLITE_", "OTEL_", "VIRTUAL_ENV"))
        }
        env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
        env["METRICS_KEY"] = found.group(1)
        env["METRICS_ADMIN_API_KEY"] = ADMIN_KEY
        state = tmp_path / "state.sh"
        state.write_text("")
        yield Page(workdir, service, prometheus_port, env, state, found.group(1))
    finally:
        service.stop()


def run_shell(page: Page, block: Block) -> None:
    script = page.workdir.parent / "block.sh"
    script.write_text(
        f'set -euo pipefail\n. "{page.state}"\n{page.substitute(block.code)}\n'
        f'export -p > "{page.state}"\n'
    )
    done = subprocess.run(
        ["bash", str(script)],
        cwd=page.workdir,
        env=page.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"{block.where}: exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n"
        f"{done.stderr}\n--- service log\n{page.service.log()[-3000:]}"
    )
    # No pause after a block that made a key with the CLI: the docs say it works at once.
    page.output, page.checked = done.stdout, False


def send_request(page: Page, block: Block, followed_by_response: bool) -> None:
    words = block.marker.split() if block.marker else []
    assert len(words) >= 3, f"{block.where}: `request METHOD PATH key=ROLE [status=N]`"
    method, path = words[1], words[2]
    options = dict(w.split("=", 1) for w in words[3:])
    assert set(options) <= {"key", "status"}, f"{block.where}: {options}"
    key = page.key(options.get("key", "none"))
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    r = httpx.request(
        method, page.service.url + path, content=block.code.encode(), headers=headers, timeout=30
    )
    status = int(options.get("status", "200"))
    assert r.status_code == status, f"{block.where}: {r.status_code} {r.text}"
    if method == "POST" and path == "/metrics" and status == 200 and not followed_by_response:
        body = r.json()
        sent = len(json.loads(block.code)["metrics"])
        assert (body["accepted"], body["rejected"]) == (sent, 0), f"{block.where}: {body}"
    page.output, page.checked = r.text, False


def matches(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected`` ("..." matches anything)."""
    if isinstance(expected, str) and expected.endswith(("...", "…")):
        prefix = expected.rstrip(".…")
        ok = isinstance(actual, str) and actual.startswith(prefix) if prefix else True
        return [] if ok else [f"{where}: {actual!r} is not {expected!r}"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not an object"]
        problems = []
        for k, v in expected.items():
            if k not in actual:
                problems.append(f"{where}.{k}: missing")
            else:
                problems += matches(v, actual[k], f"{where}.{k}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r} is not like {expected!r}"]
        return [p for i, e in enumerate(expected) for p in matches(e, actual[i], f"{where}[{i}]")]
    return [] if expected == actual else [f"{where}: {actual!r} != {expected!r}"]


def check_response(page: Page, block: Block) -> None:
    assert page.output is not None, f"{block.where}: a response with nothing before it"
    if block.lang == "json":
        text = page.output.strip()
        try:
            actual = json.loads(text)
        except ValueError:
            actual = json.loads(text.splitlines()[-1])
        problems = matches(json.loads(block.code), actual)
        assert not problems, f"{block.where}: {problems}\nactual: {page.output}"
    else:
        for line in block.code.strip().splitlines():
            assert line.strip() in page.output, f"{block.where}: {line!r} not in {page.output!r}"
    page.checked = True


def call_first_tool(command: str, args: list[str], env: dict[str, str]) -> str:
    from mcp import StdioServerParameters

    params = StdioServerParameters(command=command, args=args, env=env)

    def arguments(tool: Any) -> dict[str, Any]:
        # mcp 2.x names it input_schema, 1.x inputSchema.
        schema = getattr(tool, "input_schema", None) or getattr(tool, "inputSchema", {})
        kinds = {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True}
        props = schema.get("properties", {})
        return {name: kinds.get(p.get("type"), "x") for name, p in props.items()}

    async def session() -> str:
        try:
            from mcp import Client
        except ImportError:  # mcp 1.x
            from mcp import ClientSession
            from mcp.client.stdio import stdio_client

            async with stdio_client(params) as streams, ClientSession(*streams) as s:
                await s.initialize()
                tool = (await s.list_tools()).tools[0]
                result = await s.call_tool(tool.name, arguments(tool))
                assert not getattr(result, "isError", False), result
                return str(tool.name)
        async with Client(params, mode="legacy", cache=None) as client:
            tool = (await client.list_tools()).tools[0]
            result = await client.call_tool(tool.name, arguments(tool))
            assert not getattr(result, "is_error", getattr(result, "isError", False)), result
            return str(tool.name)

    return asyncio.run(asyncio.wait_for(session(), 60))


def run_mcp_client_config(page: Page, block: Block) -> None:
    config = json.loads(page.substitute(block.code))
    assert config["mcpServers"], block.where
    for name, server in config["mcpServers"].items():

        def local(text: str) -> str:
            return text.replace("/path/to/mcp-metrics-service/", f"{page.workdir}/").replace(
                "/path/to/", f"{page.workdir}/"
            )

        env = {k: (page.ingest_key if v.endswith("...") else v) for k, v in server["env"].items()}
        assert {"METRICS_SERVICE_URL", "METRICS_API_KEY", "METRICS_SERVICE_NAME"} <= set(env)
        tool = call_first_tool(local(server["command"]), [local(a) for a in server["args"]], env)

        def stored(tool: str = tool) -> bool:
            rows = db_rows(
                page.service.db_path,
                "SELECT count(*) FROM tool_metrics WHERE method = 'tools/call' AND tool_name = ?",
                (tool,),
            )
            return bool(rows[0][0])

        wait_for(stored, 30)
        page.notes.append(f"{name}: {tool} stored")


RUN_FILES = [p for p in DOC_FILES if any(b.kind in RUNNABLE for b in parse_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_FILES, ids=_ids(RUN_FILES))
def test_the_examples_of_a_page_run_against_a_real_service(path: Path, page_env: Page) -> None:
    page = page_env
    blocks = parse_blocks(path)
    for i, block in enumerate(blocks):
        following = blocks[i + 1].kind if i + 1 < len(blocks) else None
        if block.kind == "run":
            run_shell(page, block)
        elif block.kind == "request":
            send_request(page, block, following == "response")
        elif block.kind == "response":
            check_response(page, block)
        elif block.kind == "file":
            assert block.marker is not None
            (page.workdir / block.marker.split(maxsplit=1)[1]).write_text(block.code)
        elif block.kind == "mcp-client-config":
            run_mcp_client_config(page, block)
    # The service took every request of the page without an error of its own.
    assert "Traceback" not in page.service.log(), page.service.log()
