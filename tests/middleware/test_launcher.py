"""`python -m mcp_metrics.mcp` as a real process: it serves an unmodified MCP server over HTTP on
the `--host`/`--port` given, and answers a target it cannot run (already instrumented, missing,
not an MCP server) with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ._mcp_support import connect, events, is_error, server_env, wait_listening
from .conftest import REPO_ROOT, IngestServer, async_wait_until, free_port, stop_process

PLAIN = "tests.middleware.plain_mcp_server:server"


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcp_metrics.mcp", *args]


@contextmanager
def launched(args: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_listening(proc, port)
        yield proc
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("transport", "host"),
    [("streamable-http", "127.0.0.1"), ("sse", None)],
    ids=["streamable-http-host-port", "sse-port"],
)
async def test_http_transports_listen_on_the_given_port(
    ingest: IngestServer, transport: str, host: str | None
) -> None:
    port = free_port()
    args = launcher(PLAIN, "--transport", transport, "--port", str(port))
    if host is not None:
        args += ["--host", host]
    with launched(args, server_env(ingest.url), port):
        url = f"http://127.0.0.1:{port}{'/sse' if transport == 'sse' else '/mcp'}"
        async with connect(transport, url, "legacy") as session:
            assert await session.list_tools() == ["shout"]
            assert not is_error(await session.call("shout", {"text": "hi"}))
        await async_wait_until(
            lambda: events(ingest, "tool_execution", method="tools/call"), what="the call"
        )
    [call] = events(ingest, "tool_execution", method="tools/call")
    assert call["dimensions"]["tool_name"] == "shout"
    assert call["dimensions"]["transport"] == transport
    assert call["dimensions"]["server_name"] == "plain-server"


def fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the launcher expecting exit code 2; returns its stderr."""
    done = subprocess.run(
        launcher(*args),
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == ""  # under stdio that is the MCP stream
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("tests.middleware.mcp_app:high_level", "is already instrumented"),
        ("no_such_module:server", "no module named 'no_such_module'"),
        ("tests.middleware.plain_mcp_server:nope", "has no attribute 'nope'"),
        ("os:sep", "not an MCP server"),
        ("plain_mcp_server", "expected module:attribute"),
    ],
)
def test_a_target_it_cannot_run_gets_one_line(ingest: IngestServer, target: str, says: str) -> None:
    # mcp_app.high_level builds its server and instruments it itself.
    stderr = fails(target, env=server_env(ingest.url))
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and says in stderr, stderr


def test_host_and_port_are_refused_for_stdio(ingest: IngestServer) -> None:
    stderr = fails(PLAIN, "--port", "9000", env=server_env(ingest.url))
    assert "--host and --port are for --transport sse or streamable-http" in stderr
