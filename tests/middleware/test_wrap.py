"""`mcp-metrics wrap` around the official reference server, driven by the official clients.

The rows are read from the real metrics service's database; the MCP traffic is the npm
`@modelcontextprotocol/server-everything` over stdio, driven by the MCP Inspector CLI, the
Python SDK's client and a raw JSON-RPC driver (for byte-for-byte comparisons).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from mcp import StdioServerParameters

from ._mcp_support import connect, is_error
from ._npm import NpmTools
from ._wire import MCP_METRICS, StdioDriver, call, handshake, metered_env, rpc
from .conftest import RunningService, free_port

pytestmark = pytest.mark.anyio

TOOL_ROWS = (
    "SELECT tool_name, success, method, transport, client_name, client_version, server_name,"
    " input_size_bytes, output_size_bytes, dimensions, error_type, protocol_version"
    " FROM tool_metrics"
    " WHERE instance_id = ? AND method = 'tools/call' ORDER BY ts, id"
)


def _dims(row: Any) -> dict[str, Any]:
    """The row's dimensions: the untyped ones from JSON, with the semconv ones from their typed
    columns (migration 7)."""
    dims = dict(json.loads(row["dimensions"] or "{}"))
    for name in ("error_type", "protocol_version"):
        if row[name] is not None:
            dims[name] = row[name]
    return dims


def _wrapped(npm_tools: NpmTools, *extra: str) -> list[str]:
    return [*MCP_METRICS, "wrap", *extra, "--", *npm_tools.everything, "stdio"]


def _inspector(npm_tools: NpmTools, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    # Like a desktop client, the Inspector starts the server with a minimal environment: the
    # METRICS_* variables go in explicitly (the `env` block of a client config).
    pass_env = [f"{k}={v}" for k, v in env.items() if k.startswith("METRICS_")]
    argv = [*npm_tools.inspector, *[a for kv in pass_env for a in ("-e", kv)], *args, "--"]
    argv += [*MCP_METRICS, "wrap", "--", *npm_tools.everything]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_inspector_cli_tool_calls_become_exactly_that_many_rows(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    env = metered_env(metrics_service)
    calls = [
        ("get-sum", ["a=2", "b=3"], True),
        ("echo", ["message=hello"], True),
        ("get-sum", ["a=x"], False),  # the server answers with isError (invalid arguments)
    ]
    procs = [
        _inspector(npm_tools, env, "--method", "tools/call", "--tool-name", name, "--tool-arg", *a)
        for name, a, _ in calls
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode == 0 for p in procs] == [ok for _, _, ok in calls], outputs
    assert b"The sum of 2 and 3 is 5." in outputs[0][0]
    rows = metrics_service.wait_rows(TOOL_ROWS, (env["METRICS_INSTANCE_ID"],), count=3)
    # Three Inspector processes run concurrently: compare the multiset.
    assert sorted((r["tool_name"], r["success"]) for r in rows) == [
        ("echo", 1),
        ("get-sum", 0),
        ("get-sum", 1),
    ]
    failed = next(r for r in rows if not r["success"])
    assert _dims(failed)["error_type"] == "tool_error"
    for row in rows:
        assert row["transport"] == "stdio"
        assert row["client_name"], "the Inspector names itself in initialize"
        assert row["input_size_bytes"] > 0 and row["output_size_bytes"] > 0
        assert _dims(row)["protocol_version"]
    time.sleep(0.5)  # a fourth row would have arrived by now: the clients are long gone
    assert len(metrics_service.rows(TOOL_ROWS, (env["METRICS_INSTANCE_ID"],))) == 3


async def test_python_sdk_session_through_wrap(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    env = metered_env(metrics_service)
    argv = _wrapped(npm_tools)
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
    async with connect("stdio", params, "legacy") as session:
        assert {"get-sum", "echo"} <= set(await session.list_tools())
        for i in range(5):
            result = await session.call("get-sum", {"a": i, "b": 1})
            assert not is_error(result)
        assert is_error(await session.call("get-sum", {"a": "not a number"}))
        await session.call("echo", {"message": "x" * 1000})
    instance = env["METRICS_INSTANCE_ID"]
    rows = metrics_service.wait_rows(TOOL_ROWS, (instance,), count=7)
    # The rows of one batch need not keep their order in the table: compare the multiset.
    assert sorted((r["tool_name"], r["success"]) for r in rows) == sorted(
        [*[("get-sum", 1)] * 5, ("get-sum", 0), ("echo", 1)]
    )
    assert {(r["client_name"], r["client_version"]) for r in rows} == {("pytest-client", "7.0")}
    assert {r["server_name"] for r in rows} == {"mcp-servers/everything"}
    echo = next(r for r in rows if r["tool_name"] == "echo")
    assert echo["input_size_bytes"] > 1000 and echo["output_size_bytes"] > 1000
    flows = metrics_service.wait_rows(
        "SELECT flow_step, duration_ms FROM protocol_latency_metrics WHERE instance_id = ?",
        (instance,),
        count=3,
    )
    assert {f["flow_step"] for f in flows} == {
        "initialize->tools/list",
        "tools/list->tools/call",
        "initialize->tools/call",
    }
    others = metrics_service.rows(
        "SELECT method FROM tool_metrics WHERE instance_id = ? AND method != 'tools/call'",
        (instance,),
    )
    assert {"initialize", "tools/list"} <= {r["method"] for r in others}


def _scripted_session(driver: StdioDriver) -> list[dict[str, Any] | None]:
    replies = [driver.send(m) for m in handshake()]
    replies.append(driver.send(rpc(2, "tools/list")))
    replies.append(driver.send(call(3, "get-sum", {"a": 40, "b": 2})))
    replies.append(driver.send(call(4, "echo", {"message": "ünïcödé ✓"})))
    replies.append(driver.send(call(5, "get-sum", {"a": "NaN"})))
    replies.append(driver.send(call(6, "no-such-tool", {})))
    # The server asks the client for a completion in the middle of this call.
    replies.append(driver.send(call(7, "trigger-sampling-request", {"prompt": "hi"})))
    replies.append(driver.send(rpc(8, "ping")))
    return replies


def _stable(transcript: bytes) -> list[bytes]:
    # The server sends tools/list_changed from its own timers after the handshake; how many
    # arrive before the next response varies from run to run with or without the wrapper.
    return [
        line for line in transcript.split(b"\n") if b"notifications/tools/list_changed" not in line
    ]


def test_wrapped_session_is_byte_identical_and_metered(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    plain = StdioDriver([*npm_tools.everything, "stdio"], metered_env(metrics_service))
    plain_replies = _scripted_session(plain)
    plain_status = plain.finish()

    env = metered_env(metrics_service)
    wrapped = StdioDriver(_wrapped(npm_tools), env)
    wrapped_replies = _scripted_session(wrapped)
    wrapped_status = wrapped.finish()

    assert wrapped_replies == plain_replies
    assert _stable(wrapped.transcript) == _stable(plain.transcript)
    assert wrapped_status == plain_status
    sampling = wrapped_replies[7]
    assert sampling is not None and "a canned completion" in json.dumps(sampling)

    rows = metrics_service.wait_rows(
        "SELECT method, tool_name, success, client_name, dimensions, error_type, protocol_version"
        " FROM tool_metrics"
        " WHERE instance_id = ? ORDER BY ts, id",
        (env["METRICS_INSTANCE_ID"],),
        count=9,  # the ping's row may land after the others
    )
    seen = [(r["method"], r["tool_name"], r["success"], _dims(r).get("error_type")) for r in rows]
    assert (
        seen
        == [
            ("initialize", None, 1, None),
            ("tools/list", None, 1, None),
            ("tools/call", "get-sum", 1, None),
            ("tools/call", "echo", 1, None),
            ("tools/call", "get-sum", 0, "tool_error"),
            ("tools/call", "no-such-tool", 0, "tool_error"),
            ("sampling/createMessage", None, 1, None),
            ("tools/call", "trigger-sampling-request", 1, None),
            ("ping", None, 1, None),
        ][: len(seen)]
    )
    assert len(seen) == 9
    directions = {r["method"]: _dims(r)["direction"] for r in rows}
    assert directions["sampling/createMessage"] == "server_to_client"
    assert directions["tools/call"] == "client_to_server"
    assert {r["client_name"] for r in rows} == {"raw-driver"}


def test_service_down_changes_nothing_for_the_session(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    plain = StdioDriver([*npm_tools.everything, "stdio"], metered_env(metrics_service))
    plain_replies = _scripted_session(plain)
    plain.finish()
    # Nothing listens on this port: every POST fails to connect.
    down = StdioDriver(_wrapped(npm_tools), metered_env(f"http://127.0.0.1:{free_port()}"))
    down_replies = _scripted_session(down)
    started = time.monotonic()
    status = down.finish()
    assert down_replies == plain_replies
    assert _stable(down.transcript) == _stable(plain.transcript)
    assert status == -15  # the SIGTERM that finish() sends, passed on
    # Closing waits at most METRICS_CLIENT_SHUTDOWN_TIMEOUT_S (3 s here) for the dead service.
    assert time.monotonic() - started < 15


def test_cancelled_and_unanswered_requests(
    npm_tools: NpmTools, metrics_service: RunningService
) -> None:
    env = metered_env(metrics_service)
    driver = StdioDriver(_wrapped(npm_tools), env)
    for message in handshake():
        driver.send(message)
    long_call = {"duration": 30, "steps": 30}
    assert driver.proc.stdin is not None
    for message in (
        call(2, "trigger-long-running-operation", long_call),
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}},
        call(3, "trigger-long-running-operation", long_call),
    ):
        driver.proc.stdin.write(json.dumps(message).encode() + b"\n")
    driver.proc.stdin.flush()
    assert driver.send(rpc(4, "ping")) == {"jsonrpc": "2.0", "id": 4, "result": {}}
    driver.proc.send_signal(signal.SIGTERM)  # request 3 is still running: never answered
    driver.finish()
    rows = metrics_service.wait_rows(
        "SELECT tool_name, success, dimensions, error_type, protocol_version"
        " FROM tool_metrics"
        " WHERE instance_id = ? AND method = 'tools/call' ORDER BY ts, id",
        (env["METRICS_INSTANCE_ID"],),
        count=2,
    )
    assert [(r["tool_name"], r["success"], _dims(r)["error_type"]) for r in rows] == [
        ("trigger-long-running-operation", 0, "cancelled"),
        ("trigger-long-running-operation", 0, "no_response"),
    ]


# -- the wrapper as a process: exit status, signals, stderr (no npm needed) -------------------

_CHILD = """
import signal, sys, time
def on_term(signum, frame):
    sys.stderr.write(f"child got {signum}\\n"); sys.stderr.flush(); sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
sys.stderr.write("child started\\n"); sys.stderr.flush()
mode = sys.argv[1]
if mode == "exit":
    sys.exit(7)
if mode == "kill":
    import os; os.kill(os.getpid(), signal.SIGKILL)
for line in sys.stdin:
    sys.stdout.write(line); sys.stdout.flush()
sys.stderr.write("child saw eof\\n")
"""


def _wrap_child(mode: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MCP_METRICS, "wrap", "--", sys.executable, "-c", _CHILD, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_exit_code_and_stderr_pass_through() -> None:
    proc = _wrap_child("exit", metered_env("http://127.0.0.1:9"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7
    assert out == b""
    assert b"child started\n" in err


def test_a_child_killed_by_a_signal_kills_the_wrapper_with_it() -> None:
    proc = _wrap_child("kill", metered_env("http://127.0.0.1:9"))
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_signals_are_forwarded_and_stdio_is_relayed() -> None:
    proc = _wrap_child("echo", metered_env("http://127.0.0.1:9"))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b'{"jsonrpc":"2.0","method":"x"}\n')
    proc.stdin.flush()
    assert proc.stdout.readline() == b'{"jsonrpc":"2.0","method":"x"}\n'
    proc.send_signal(signal.SIGTERM)
    # stdin stays open until the child has the signal: communicate() closes it, and an EOF
    # relayed before the forwarded signal let the child end on its own (seen under load).
    err = _read_until(proc.stderr, b"child got 15\n", 30)
    _, rest = proc.communicate(timeout=30)
    assert b"child got 15\n" in err + rest
    assert proc.returncode == 3


def _read_until(stream: Any, marker: bytes, timeout_s: float) -> bytes:
    """What ``stream`` gives until ``marker`` is in it, the stream ends, or the timeout."""
    got = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while marker not in got and time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(stream.fileno(), 4096)
                if not chunk:
                    break
                got += chunk
    return got


def test_stdin_eof_reaches_the_child() -> None:
    proc = _wrap_child("echo", metered_env("http://127.0.0.1:9"))
    out, err = proc.communicate(b"not json at all\n", timeout=30)
    assert out == b"not json at all\n"
    assert b"child saw eof" in err
    assert proc.returncode == 0


def test_a_missing_command_is_one_line_and_127() -> None:
    proc = subprocess.run(
        [*MCP_METRICS, "wrap", "--", "/nonexistent/mcp-server"],
        capture_output=True,
        timeout=30,
        env=metered_env("http://127.0.0.1:9"),
    )
    assert proc.returncode == 127
    assert proc.stdout == b""
    assert proc.stderr.strip().splitlines()[-1].startswith(b"error: cannot start")
