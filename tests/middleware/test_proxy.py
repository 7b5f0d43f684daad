"""`mcp-metrics proxy` in front of the official reference server over streamable HTTP and SSE.

The upstream is the npm `@modelcontextprotocol/server-everything`, the clients are the MCP
Inspector CLI and the Python SDK; the rows are read from the real metrics service.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from ._mcp_support import connect, is_error, wait_listening
from ._npm import NpmTools
from ._wire import MCP_METRICS, metered_env
from .conftest import RunningService, free_port, stop_process

pytestmark = pytest.mark.anyio

MODES = {"streamable-http": ("streamableHttp", "/mcp"), "sse": ("sse", "/sse")}
ROWS = (
    "SELECT tool_name, success, transport, client_name, session_id, input_size_bytes,"
    " output_size_bytes, dimensions, error_type, protocol_version"
    " FROM tool_metrics WHERE instance_id = ? AND method = 'tools/call' ORDER BY ts, id"
)


@contextmanager
def _process(argv: list[str], env: dict[str, str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port)
        yield
    finally:
        stop_process(proc)
        assert proc.stderr is not None
        proc.stderr.close()


@contextmanager
def proxied(npm_tools: NpmTools, transport: str, env: dict[str, str]) -> Iterator[str]:
    """server-everything on one port, the proxy on another; yields the client's URL."""
    mode, path = MODES[transport]
    upstream, listen = free_port(), free_port()
    with (
        _process([*npm_tools.everything, mode], {**os.environ, "PORT": str(upstream)}, upstream),
        _process(
            [
                *MCP_METRICS,
                "proxy",
                "--listen",
                f"127.0.0.1:{listen}",
                "--upstream",
                f"http://127.0.0.1:{upstream}",
            ],
            env,
            listen,
        ),
    ):
        yield f"http://127.0.0.1:{listen}{path}"


def _dims(row: Any) -> dict[str, Any]:
    """The row's dimensions: the untyped ones from JSON, with the semconv ones from their typed
    columns (migration 7)."""
    dims = dict(json.loads(row["dimensions"] or "{}"))
    for name in ("error_type", "protocol_version"):
        if row[name] is not None:
            dims[name] = row[name]
    return dims


@pytest.mark.parametrize("transport", list(MODES))
def test_inspector_cli_through_the_proxy(
    npm_tools: NpmTools, metrics_service: RunningService, transport: str
) -> None:
    env = metered_env(metrics_service)
    with proxied(npm_tools, transport, env) as url:
        calls = [
            ("get-sum", ["a=1", "b=2"], 0),
            ("echo", ["message=hi"], 0),
            ("get-sum", ["a=x"], 5),
        ]
        for name, args, status in calls:
            done = subprocess.run(
                [
                    *npm_tools.inspector,
                    url,
                    "--method",
                    "tools/call",
                    "--tool-name",
                    name,
                    "--tool-arg",
                    *args,
                ],
                capture_output=True,
                timeout=60,
            )
            assert done.returncode == status, done.stderr
        rows = metrics_service.wait_rows(ROWS, (env["METRICS_INSTANCE_ID"],), count=3)
    assert [(r["tool_name"], r["success"]) for r in rows] == [
        ("get-sum", 1),
        ("echo", 1),
        ("get-sum", 0),
    ]
    assert _dims(rows[2])["error_type"] == "tool_error"
    assert {r["transport"] for r in rows} == {transport}
    sessions = [r["session_id"] for r in rows]
    assert all(sessions) and len(set(sessions)) == 3, "one Inspector process, one session"


@pytest.mark.parametrize("transport", list(MODES))
async def test_python_sdk_through_the_proxy(
    npm_tools: NpmTools, metrics_service: RunningService, transport: str
) -> None:
    env = metered_env(metrics_service)
    instance = env["METRICS_INSTANCE_ID"]
    with proxied(npm_tools, transport, env) as url:
        async with connect(transport, url, "legacy") as session:
            assert "get-sum" in await session.list_tools()
            for i in range(4):
                assert not is_error(await session.call("get-sum", {"a": i, "b": i}))
            assert is_error(await session.call("get-sum", {"b": 1}))
            await session.call("echo", {"message": "y" * 5000})
        rows = metrics_service.wait_rows(ROWS, (instance,), count=6)
        flows = metrics_service.wait_rows(
            "SELECT flow_step FROM protocol_latency_metrics WHERE instance_id = ?",
            (instance,),
            count=3,
        )
    assert sorted((r["tool_name"], r["success"]) for r in rows) == sorted(
        [*[("get-sum", 1)] * 4, ("get-sum", 0), ("echo", 1)]
    )
    assert {(r["transport"], r["client_name"]) for r in rows} == {(transport, "pytest-client")}
    assert len({r["session_id"] for r in rows}) == 1 and rows[0]["session_id"]
    echo = next(r for r in rows if r["tool_name"] == "echo")
    assert echo["input_size_bytes"] > 5000 and echo["output_size_bytes"] > 5000
    assert {f["flow_step"] for f in flows} == {
        "initialize->tools/list",
        "tools/list->tools/call",
        "initialize->tools/call",
    }


async def test_the_sse_stream_is_relayed_as_it_comes(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    # The legacy SSE stream never ends: its first event arriving at all shows no buffering.
    with proxied(npm_tools, "sse", metered_env(metrics_service)) as url:
        async with (
            httpx.AsyncClient(timeout=20) as http,
            http.stream("GET", url, headers={"Accept": "text/event-stream"}) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == "event: endpoint"
            assert (await anext(lines)).startswith("data: /message?sessionId=")


async def test_service_down_changes_nothing_for_proxied_sessions(npm_tools: NpmTools) -> None:
    env = metered_env(f"http://127.0.0.1:{free_port()}")
    with proxied(npm_tools, "streamable-http", env) as url:
        async with connect("streamable-http", url, "legacy") as session:
            for i in range(3):
                assert not is_error(await session.call("get-sum", {"a": i, "b": 2}))


def test_an_unreachable_upstream_is_a_502(metrics_service: RunningService) -> None:
    listen = free_port()
    argv = [
        *MCP_METRICS,
        "proxy",
        "--listen",
        f"127.0.0.1:{listen}",
        "--upstream",
        f"http://127.0.0.1:{free_port()}",
    ]
    with _process(argv, metered_env(metrics_service), listen):
        response = httpx.post(f"http://127.0.0.1:{listen}/mcp", json={"jsonrpc": "2.0"}, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"].startswith("upstream unreachable")
