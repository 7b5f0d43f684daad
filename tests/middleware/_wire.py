"""Helpers for the wrap/proxy tests: the `mcp-metrics` command and a raw JSON-RPC stdio driver."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .conftest import RunningService

MCP_METRICS = [str(Path(sys.executable).with_name("mcp-metrics"))]
if not Path(MCP_METRICS[0]).exists():  # not installed as a script: the same entry point
    MCP_METRICS = [sys.executable, "-m", "mcp_metrics.proxy"]

# No "roots": the server would ask for them on its own timer, at a different point each run.
CAPABILITIES = {"sampling": {}}
SAMPLING_RESULT = {
    "role": "assistant",
    "content": {"type": "text", "text": "a canned completion"},
    "model": "pytest-model",
    "stopReason": "endTurn",
}


def metered_env(service: RunningService | str, instance: str | None = None) -> dict[str, str]:
    """Environment for `mcp-metrics` reporting to `service` (or to a URL that is down)."""
    url = service if isinstance(service, str) else service.url
    key = "k" * 32 if isinstance(service, str) else service.api_keys["mw-mcp"]
    return {
        **os.environ,
        "METRICS_SERVICE_URL": url,
        "METRICS_API_KEY": key,
        "METRICS_SERVICE_NAME": "mw-mcp",
        "METRICS_INSTANCE_ID": instance or f"wrap-{uuid.uuid4().hex[:12]}",
        "METRICS_CLIENT_FLUSH_INTERVAL_S": "0.1",
        "METRICS_CLIENT_SHUTDOWN_TIMEOUT_S": "3",
    }


def rpc(id_: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return message


def handshake() -> list[dict[str, Any]]:
    return [
        rpc(
            1,
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": CAPABILITIES,
                "clientInfo": {"name": "raw-driver", "version": "3.1"},
            },
        ),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]


def call(id_: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return rpc(id_, "tools/call", {"name": tool, "arguments": arguments})


class StdioDriver:
    """Speaks newline-delimited JSON-RPC to a process, one request at a time.

    Each message is written in two pieces (cut mid-frame); a request waits for its response;
    a request from the server (sampling/createMessage, roots/list) is answered with a canned
    result. `transcript` is every byte the process wrote on stdout.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.transcript = b""
        self.errors = b""
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
        line = json.dumps(message).encode() + b"\n"
        assert self.proc.stdin is not None
        half = len(line) // 2
        self.proc.stdin.write(line[:half])
        self.proc.stdin.flush()
        self.proc.stdin.write(line[half:])
        self.proc.stdin.flush()
        if "id" not in message or "method" not in message:
            return None
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline):
                if reply.get("id") == message["id"] and "method" not in reply:
                    return reply
                if "method" in reply and "id" in reply:
                    self.send(self._answer(reply))

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["method"] == "sampling/createMessage":
            return {"jsonrpc": "2.0", "id": request["id"], "result": SAMPLING_RESULT}
        if request["method"] == "roots/list":
            return {"jsonrpc": "2.0", "id": request["id"], "result": {"roots": []}}
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no"}}

    def _messages(self, deadline: float) -> list[dict[str, Any]]:
        while b"\n" not in self._buffer:
            if time.monotonic() > deadline:
                raise AssertionError(f"no response; stdout so far: {self.transcript[-500:]!r}")
            self._selector.select(0.1)
            assert self.proc.stdout is not None
            chunk = self.proc.stdout.read()
            if chunk == b"":
                raise AssertionError(f"stdout closed; stderr: {self.stderr()[-1000:]!r}")
            if chunk:
                self.transcript += chunk
                self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def finish(self, timeout: float = 30.0, *, terminate: bool = True) -> int:
        """Close stdin (and send SIGTERM: the reference server outlives its stdin), read stdout
        to the end, and the exit status."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        if terminate:
            self.proc.terminate()
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("the process did not end after stdin closed")
            self._selector.select(0.1)
            chunk = self.proc.stdout.read()
            if chunk == b"":
                break
            if chunk:
                self.transcript += chunk
        self._selector.close()
        status = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        self.errors = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return status

    def stderr(self) -> bytes:
        if self.proc.poll() is None or self.proc.stderr is None:
            return b""
        return self.proc.stderr.read()
