"""The observer's rules on wire messages: pairing, the semconv error rules, batches, sizes.

Events go through the real `Recorder` (its queue is read back; nothing is sent).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from mcp_metrics import Recorder
from mcp_metrics.proxy.observer import CLIENT_TO_SERVER as C2S
from mcp_metrics.proxy.observer import SERVER_TO_CLIENT as S2C
from mcp_metrics.proxy.observer import Observer
from mcp_metrics.proxy.stdio import StdioWrapper


class _Queued(Recorder):
    """The recording half only: events stay in the queue."""

    def _wake(self) -> None:
        pass

    def events(self, type_: str = "tool_execution") -> list[dict[str, Any]]:
        return [e for e in self._queue if e["type"] == type_]


def _observer(**options: Any) -> tuple[_Queued, Observer]:
    recorder = _Queued(url="http://127.0.0.1:9", api_key="k" * 32, service="s")
    return recorder, Observer(recorder, transport="stdio", **options)


def _line(message: Any) -> bytes:
    return json.dumps(message).encode()


def _call(id_: Any, tool: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool}}


def test_error_codes_follow_the_server_rule() -> None:
    recorder, observer = _observer()
    session = observer.session()
    answers = [
        {"error": {"code": -32602, "message": "unknown tool"}},  # not an error for a server
        {"error": {"code": -32603, "message": "internal"}},
        {"error": "not an object"},
        {"result": {"content": [], "isError": True}},
        {"result": {"content": []}},
    ]
    for i, answer in enumerate(answers):
        session.frame(C2S, _line(_call(i, f"t{i}")), 10, at=float(i))
        session.frame(S2C, _line({"jsonrpc": "2.0", "id": i, **answer}), 20, at=i + 0.25)
    got = [
        (
            e["dimensions"]["tool_name"],
            e["dimensions"]["success"],
            e["dimensions"].get("error_type"),
            e["dimensions"].get("rpc_status_code"),
            e["duration_ms"],
        )
        for e in recorder.events()
    ]
    assert got == [
        ("t0", True, None, "-32602", 250.0),
        ("t1", False, "-32603", "-32603", 250.0),
        ("t2", False, "_OTHER", None, 250.0),
        ("t3", False, "tool_error", None, 250.0),
        ("t4", True, None, None, 250.0),
    ]
    assert {e["dimensions"]["input_size_bytes"] for e in recorder.events()} == {10}
    assert {e["dimensions"]["output_size_bytes"] for e in recorder.events()} == {20}


def test_ids_pair_by_direction_and_type() -> None:
    recorder, observer = _observer()
    session = observer.session()
    # The client's request 1 and the server's request 1 are different requests; so are 1 and "1".
    session.frame(C2S, _line(_call(1, "mine")), 5, 0.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 1, "method": "roots/list"}), 5, 0.0)
    session.frame(C2S, _line(_call("1", "string-id")), 5, 0.0)
    session.frame(C2S, _line({"jsonrpc": "2.0", "id": 1, "result": {"roots": []}}), 5, 1.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": "1", "result": {}}), 5, 2.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 1, "result": {}}), 5, 3.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 1, "result": {}}), 5, 4.0)  # a duplicate
    got = [
        (e["dimensions"]["method"], e["dimensions"].get("tool_name"), e["dimensions"]["direction"])
        for e in recorder.events()
    ]
    assert got == [
        ("roots/list", None, S2C),
        ("tools/call", "string-id", C2S),
        ("tools/call", "mine", C2S),
    ]


def test_batches_notifications_and_cancellation() -> None:
    recorder, observer = _observer()
    session = observer.session()
    batch = [_call(1, "a"), _call(2, "b"), {"jsonrpc": "2.0", "method": "notifications/progress"}]
    session.frame(C2S, _line(batch), 999, 0.0)
    session.frame(
        C2S,
        _line({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}}),
        50,
        1.0,
    )
    session.frame(S2C, _line([{"jsonrpc": "2.0", "id": 1, "result": {}}]), 30, 2.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 2, "result": {}}), 30, 3.0)  # too late
    session.frame(C2S, _line(_call(3, "c")), 10, 4.0)
    session.frame(C2S, b"{not json", 9, 4.5)
    session.close(at=5.0)
    got = [
        (
            e["dimensions"]["tool_name"],
            e["dimensions"]["success"],
            e["dimensions"].get("error_type"),
        )
        for e in recorder.events()
    ]
    assert got == [("b", False, "cancelled"), ("a", True, None), ("c", False, "no_response")]
    # A batch member is sized by its own JSON, not by the whole line.
    sizes = {
        e["dimensions"]["tool_name"]: e["dimensions"]["input_size_bytes"] for e in recorder.events()
    }
    assert sizes["a"] == len(json.dumps(batch[0], separators=(",", ":")))


def test_client_identity_protocol_version_and_server_name() -> None:
    recorder, observer = _observer(methods={"tools/call"})
    session = observer.session()
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-03-26",
            "clientInfo": {"name": "desk", "version": "9"},
            "capabilities": {},
        },
    }
    session.frame(C2S, _line(init), 1, 0.0)
    result = {"protocolVersion": "2025-06-18", "serverInfo": {"name": "files", "version": "1"}}
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 0, "result": result}), 1, 0.5)
    session.frame(C2S, _line(_call(1, "read")), 1, 1.0)
    session.frame(
        S2C, _line({"jsonrpc": "2.0", "id": 1, "result": {"_meta": {"outputTokens": 7}}}), 1, 2.0
    )
    # 2026-07-28: the request envelope names the client on every request.
    envelope = _call(2, "read")
    envelope["params"]["_meta"] = {
        "io.modelcontextprotocol/clientInfo": {"name": "stateless", "version": "2"},
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "agent_id": "agent-7",
    }
    session.frame(C2S, _line(envelope), 1, 3.0)
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 2, "result": {}}), 1, 4.0)
    events = recorder.events()
    assert [e["dimensions"]["method"] for e in events] == ["tools/call", "tools/call"]  # methods=
    first, second = (e["dimensions"] for e in events)
    assert (first["client_name"], first["client_version"], first["protocol_version"]) == (
        "desk",
        "9",
        "2025-06-18",
    )
    assert first["server_name"] == "files"
    assert events[0]["metadata"] == {"output_tokens": 7}
    assert (second["client_name"], second["protocol_version"]) == ("stateless", "2026-07-28")
    assert events[1]["metadata"] == {"agent_id": "agent-7"}
    flows = recorder.events("protocol_latency")
    assert [(f["dimensions"]["flow_step"], f["duration_ms"]) for f in flows] == [
        ("initialize->tools/call", 1000.0)
    ]


def test_no_payload_content_is_recorded() -> None:
    recorder, observer = _observer()
    session = observer.session()
    secret = "s3cr3t-payload-value"
    request = _call(1, "echo")
    request["params"]["arguments"] = {"message": secret}
    session.frame(C2S, _line(request), 80, 0.0)
    answer = {"content": [{"type": "text", "text": secret}]}
    session.frame(S2C, _line({"jsonrpc": "2.0", "id": 1, "result": answer}), 90, 1.0)
    assert recorder.events() and secret not in json.dumps(list(recorder._queue))


_ANSWERING_CHILD = """
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"content": []}}
    sys.stdout.write(json.dumps(answer) + "\\n")
    sys.stdout.flush()
"""


def test_an_instant_answer_never_overtakes_its_request() -> None:
    """The stdio relay queues a chunk for the observer before delivering it: an answer read the
    moment its request arrives still pairs with it. The observer's half of the inbound relay is
    slowed here, which widens the window that existed when a chunk was queued after delivery (then
    most of these calls were recorded as unanswered)."""
    recorder, observer = _observer()

    class SlowObserverSide(StdioWrapper):
        def _copy(self, direction: str, at: float, chunk: bytes) -> None:
            if direction == C2S:
                time.sleep(0.02)
            super()._copy(direction, at, chunk)

    client_in, wrapper_in = os.pipe()
    wrapper_out, client_out = os.pipe()
    wrapper = SlowObserverSide(
        [sys.executable, "-c", _ANSWERING_CHILD], observer, stdin_fd=client_in, stdout_fd=client_out
    )
    runner = threading.Thread(target=wrapper.run)
    runner.start()
    with os.fdopen(wrapper_in, "wb", buffering=0) as to_child, os.fdopen(wrapper_out, "rb") as out:
        for i in range(8):
            to_child.write(_line(_call(i, "t")) + b"\n")
            assert json.loads(out.readline())["id"] == i
    runner.join(30)
    assert not runner.is_alive()
    os.close(client_in)
    os.close(client_out)
    events = recorder.events()
    assert len(events) == 8
    assert [e["dimensions"]["success"] for e in events] == [True] * 8
    assert {e["dimensions"].get("error_type") for e in events} == {None}
