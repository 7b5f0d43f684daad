"""MCP client-side helpers shared by the MCP tests: one API over mcp 1.x and 2.x clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from mcp import StdioServerParameters
from mcp.types import Implementation

from .conftest import API_KEY, IngestServer, free_port, stop_process

try:
    from mcp import Client

    MCP_MAJOR = 2
    MODES = ["legacy", "auto"]
except ImportError:  # mcp 1.x
    Client = None
    MCP_MAJOR = 1
    MODES = ["legacy"]

APP = Path(__file__).with_name("mcp_app.py")
CLIENT = Implementation(name="pytest-client", version="7.0")
HANDSHAKE = {"legacy": "initialize", "auto": "server/discover"}


def server_env(url: str, service: str = "mw-mcp", api_key: str = API_KEY) -> dict[str, str]:
    return {
        **os.environ,
        "METRICS_SERVICE_URL": url,
        "METRICS_API_KEY": api_key,
        "METRICS_SERVICE_NAME": service,
        "METRICS_CLIENT_FLUSH_INTERVAL_S": "0.1",
    }


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 30) -> None:
    """Until ``proc`` listens on the loopback ``port``; fails with its stderr if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"MCP server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"MCP server did not listen within {timeout_s}s") from None
            time.sleep(0.05)


@contextmanager
def http_server(transport: str, env: dict[str, str], *extra: str) -> Iterator[str]:
    """The app on a loopback port, as a process; yields its MCP URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(APP), transport, "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(proc, port)
        path = "/sse" if transport == "sse" else "/mcp"
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


class Session:
    """The few client calls the tests need, over either SDK major version."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def list_tools(self) -> list[str]:
        return [t.name for t in (await self.inner.list_tools()).tools]

    async def call(
        self, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Any:
        return await self.inner.call_tool(name, arguments, meta=meta)


@asynccontextmanager
async def connect(transport: str, target: Any, mode: str) -> AsyncIterator[Session]:
    if MCP_MAJOR == 2:
        from mcp.client.sse import sse_client

        server = sse_client(target) if transport == "sse" else target
        async with Client(server, mode=mode, client_info=CLIENT, cache=None) as client:
            yield Session(client)
        return
    from mcp import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if transport == "stdio":
        opener: Any = stdio_client(target)
    elif transport == "sse":
        opener = sse_client(target)
    else:
        opener = streamable_http_client(target)
    async with (
        opener as streams,
        ClientSession(streams[0], streams[1], client_info=CLIENT) as session,
    ):
        await session.initialize()
        yield Session(session)


@asynccontextmanager
async def target_for(transport: str, env: dict[str, str], *extra: str) -> AsyncIterator[Any]:
    if transport == "stdio":
        yield StdioServerParameters(
            command=sys.executable, args=[str(APP), "stdio", *extra], env=env
        )
    else:
        with http_server(transport, env, *extra) as url:
            yield url


def events(ingest: IngestServer, type_: str, **dims: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in ingest.accepted
        if e["type"] == type_ and all(e["dimensions"].get(k) == v for k, v in dims.items())
    ]


async def one_session(session: Session) -> None:
    assert set(await session.list_tools()) >= {"add", "fail", "summarize"}
    result = await session.call(
        "add", {"a": 1, "b": 2}, meta={"agent_id": "agent-7", "tenant_id": "acme"}
    )
    assert not is_error(result)
    assert is_error(await session.call("fail", {"reason": "bad input"}))
    assert not is_error(await session.call("summarize", {"text": "a long text to summarize"}))


def is_error(result: Any) -> bool:
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", None))
