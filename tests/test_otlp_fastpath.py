"""The direct span path gives exactly what the general path gives, for any body: the same rows,
rejections, counts, flow state and errors. Direct: only the mapped attributes decoded (protobuf
KeyValues read as bytes, each distinct one parsed once; OTLP/JSON ids and times checked inline)
and rows built without the generic validator. General: every attribute decoded by the official
messages or the helpers, each span a ``tool_event`` validated by ``Validator.add_items``.
Arbitrary span batches in both encodings, mutated protobuf bodies, odd OTLP/JSON ids and times.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from metrics_service.errors import ApiError
from metrics_service.otlp import Flows, decode_json, decode_protobuf, map_spans
from metrics_service.otlp import spans as otlp_spans
from metrics_service.settings import Settings
from metrics_service.telemetry import Telemetry
from metrics_service.validation import Validator
from tests._spans import CLIENT, INTERNAL, SERVER, SpanSpec, mcp, otlp_json, plain
from tests._spans import protobuf_resources as protobuf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from otlp_ingest import calls

NOW = 1_800_000_000.0
NOW_NS = int(NOW * 1e9)


class CountingValidator(Validator):
    """The service's validator, counting the items that took the general path."""

    items = 0

    def add_items(self, batch: Any, head: Any, items: list[tuple[int, Any]]) -> None:
        self.items += len(items)
        super().add_items(batch, head, items)


class App:
    """What ``map_spans`` reads of the app state: real settings, validator, flows, telemetry."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.validator = CountingValidator(s, clock=lambda: NOW)
        self.flows = Flows()
        self.telemetry = Telemetry(s)


LIMITS = [
    {},
    {"max_string_length": 12, "max_metadata_bytes": 90},
    {"max_dimensions": 6},  # fewer than a span can make: the general path only
    {"otlp_max_spans_per_request": 5, "queue_max_metrics": 3},
]
_SETTINGS = [Settings(db_path=Path("unused.db"), **overrides) for overrides in LIMITS]


def mostly(usual: list[Any], unusual: list[Any]) -> st.SearchStrategy[Any]:
    """Usually one of ``usual``, sometimes one of ``unusual`` (what breaks a rule)."""
    return st.sampled_from(usual * (1 + 7 * len(unusual) // len(usual)) + unusual)


HOSTILE_TEXT = ["", "x" * 20, "a\x00b", "\u00e9" * 12, "\u00dc" * 13]
text = mostly(["a", "search", "tools/list"], HOSTILE_TEXT)
scalar = mostly(
    ["a", "search", 7, 0],
    [*HOSTILE_TEXT, 1, -1, 2**62, 2**62 + 1, 2**63 - 1, True, False, 1.5, -0.0],
)
methods = mostly(
    ["tools/call", "tools/call", "tools/list", "initialize", "server/discover"],
    ["ping", "", "x" * 13, "a\x00", "tools/call"],
)
tools = mostly([None, "search", "fetch"], ["tools/list", "initialize", "", "ping", "x" * 13])
error_types = mostly([None, None, None, "-32602", "tool_error"], ["-32700", "-32603", "", 5])
transports = mostly([None, "pipe", "tcp"], ["quic", "ws", "", 3])
versions = mostly([None, "2025-06-18", "2024-11-05"], ["2026-07-28", ""])
names = mostly(
    ["span", "tools/call x", "MCP send tools/call y"],
    ["tools/call ", "a tools/call b", "\u00e9" * 13, "tools/call a\x00"],
)
extra_keys = st.sampled_from(
    [
        "server.address",
        "mcp.server.name",
        "mcp.client.name",
        "mcp.client.version",
        "network.protocol.name",
        "gen_ai.agent.id",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "jsonrpc.request.id",
        "other.key",
    ]
)
#: Event times relative to NOW: inside the retention window; else just outside it either way,
#: too far in the future, older than retention.
offsets_s = mostly([-60.0, -1.0, 0.0, 299.0, -89 * 86400.0], [301.0, 3600.0, -91 * 86400.0])
durations_ms = mostly([0.0, 5.0, 12.5], [-1.0, 86_400_000.0, 86_400_001.0])


@st.composite
def span_specs(draw: st.DrawFn, traces: list[str]) -> SpanSpec:
    if draw(st.integers(0, 9)) == 0:
        return plain()
    method = draw(methods)
    spec = mcp(
        method,
        draw(tools),
        error_type=None,
        kind=draw(st.sampled_from([SERVER, SERVER, CLIENT, INTERNAL])),
        session=draw(mostly([None, "s1", "s2"], [""])),
        transport=None,
        version=None,
        at_ns=NOW_NS + int(draw(offsets_s) * 1e9) + draw(st.integers(0, 10**6)),
        duration_ms=draw(durations_ms),
        trace_id=draw(st.sampled_from(traces)),
        extra=draw(st.dictionaries(extra_keys, scalar, max_size=3)),
    )
    for key, values in (
        ("error.type", error_types),
        ("network.transport", transports),
        ("mcp.protocol.version", versions),
    ):
        value = draw(values)
        if value is not None:
            spec.attributes[key] = value
    spec.name = draw(names)
    spec.error = draw(mostly([False], [True]))
    if draw(st.integers(0, 19)) == 0:
        spec.start_ns = 0  # end - start is the whole unix time: far too long
    return spec


resource_attrs = st.fixed_dictionaries(
    {},
    optional={
        "service.name": mostly(["svc", "unknown_service:python"], ["other", ""]),
        "service.version": st.sampled_from(["1.2", "v" * 70, 3]),
        "service.instance.id": st.sampled_from(["i-1", "", 9]),
        "host.name": text,
    },
)


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[dict[str, Any], list[SpanSpec]]]:
    traces = [f"{i + 1:032x}" for i in range(2)]
    return draw(
        st.lists(
            st.tuples(resource_attrs, st.lists(span_specs(traces), max_size=10)),
            min_size=1,
            max_size=3,
        )
    )


def as_json(resources: list[tuple[dict[str, Any], list[SpanSpec]]]) -> bytes:
    parts = [json.loads(otlp_json(spans, attrs or {"x": "y"})) for attrs, spans in resources]
    for part, (attrs, _) in zip(parts, resources, strict=True):
        if not attrs:  # otlp_json names svc when given no resource: keep it empty
            part["resourceSpans"][0]["resource"]["attributes"] = []
    body = {"resourceSpans": [rs for part in parts for rs in part["resourceSpans"]]}
    return json.dumps(body).encode()


def as_protobuf(resources: list[tuple[dict[str, Any], list[SpanSpec]]]) -> bytes:
    # protobuf_resources names no service for an empty resource (unlike protobuf()).
    return protobuf(resources)


def outcome(app: App, body: bytes, encoding: str, direct: bool) -> Any:
    decode = decode_json if encoding == "json" else decode_protobuf
    try:
        resources = decode(body) if direct else decode(body, None)
        mapped = map_spans(app, resources, "svc", direct=direct)  # type: ignore[arg-type]
    except ApiError as error:
        return ("error", type(error).__name__, error.status, str(error))
    app.flows.commit(mapped.flow_updates)
    flows = {
        key: tuple(getattr(flow, name) for name in flow.__slots__)
        for key, flow in mapped.flow_updates.items()
    }
    return (
        mapped.batch.rows,
        [r.as_dict() for r in mapped.batch.rejections],
        mapped.spans,
        mapped.not_mcp,
        mapped.rejected,
        flows,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(requests(), min_size=1, max_size=2),
    st.sampled_from(range(len(_SETTINGS))),
    st.sampled_from(["protobuf", "json"]),
)
def test_the_direct_mapping_gives_what_the_general_path_gives(
    exports: list[list[tuple[dict[str, Any], list[SpanSpec]]]], which: int, encoding: str
) -> None:
    s = _SETTINGS[which]
    direct, general = App(s), App(s)
    encode = as_json if encoding == "json" else as_protobuf
    # Two exports in a row: flow state carries over from the first.
    for resources in exports:
        body = encode(resources)
        assert outcome(direct, body, encoding, True) == outcome(general, body, encoding, False)


def test_the_bench_workload_takes_the_direct_path_whole() -> None:
    """Every span of bench/otlp_ingest.py's workload is built directly (none needs the general
    path), and the rows are what the general path makes; this also fails if the schema's row
    layout changes under the direct builder."""
    assert otlp_spans.DIRECT_LAYOUT
    s = Settings(db_path=Path("unused.db"))
    spans = calls(100, 0)
    for at, spec in enumerate(spans):  # the bench's times are relative to the real clock
        spec.start_ns, spec.end_ns = NOW_NS - 60 * 10**9 + at, NOW_NS - 60 * 10**9 + at + 12_500_000
    for encoding, body in (
        ("protobuf", as_protobuf([({"service.name": "svc"}, spans)])),
        ("json", as_json([({"service.name": "svc"}, spans)])),
    ):
        direct, general = App(s), App(s)
        got = outcome(direct, body, encoding, True)
        assert got == outcome(general, body, encoding, False)
        assert direct.validator.items == 0
        assert len(got[0]["tool_execution"]) == 100


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A protobuf body of arbitrary spans, maybe with a nested attribute value, then maybe cut,
    with bytes changed or inserted: what the raw KeyValue read must decode exactly as the
    official messages do, or refuse the same way."""
    request = ExportTraceServiceRequest.FromString(as_protobuf(draw(requests())))
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    if spans and draw(st.booleans()):
        kv = draw(st.sampled_from(spans)).attributes.add(key="mcp.session.id")
        if draw(st.booleans()):
            kv.value.array_value.values.add(string_value="a")
        else:
            kv.value.kvlist_value.values.add(key="k").value.int_value = 1
    body = bytearray(request.SerializeToString())
    for _ in range(draw(st.integers(0, 3))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        how = draw(st.sampled_from(["flip", "insert", "cut"]))
        if how == "flip":
            body[at] = draw(st.integers(0, 255))
        elif how == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=3))
        else:
            del body[at:]
    return bytes(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_the_raw_protobuf_read_decodes_or_refuses_as_the_official_one(body: bytes) -> None:
    s = _SETTINGS[0]
    assert outcome(App(s), body, "protobuf", True) == outcome(App(s), body, "protobuf", False)


HOSTILE_FIELDS = {
    "traceId": ["", "zz" * 16, "AB" * 16, "ab cd" + "0" * 27, "0" * 31, "0" * 33, "ab" * 8],
    "spanId": ["", "zz" * 8, "CD" * 8, "ab cd" + "0" * 11, "0" * 15, "ab" * 16],
    "startTimeUnixNano": ["12x", " 1800000000000000000 ", "1_800_000_000_000_000_000", 0, ""],
    "endTimeUnixNano": ["", "-1", 1_800_000_000_000_000_000, "1e18", "9" * 5000],
}


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """An OTLP/JSON body of arbitrary spans with some ids and times replaced by malformed,
    odd but valid, or unusual values."""
    body = json.loads(as_json(draw(requests())))
    spans = [s for rs in body["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    for _ in range(draw(st.integers(1, 4)) if spans else 0):
        span = draw(st.sampled_from(spans))
        name = draw(st.sampled_from(sorted(HOSTILE_FIELDS)))
        span[name] = draw(st.sampled_from(HOSTILE_FIELDS[name]))
    return json.dumps(body).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_json())
def test_odd_json_ids_and_times_decode_or_fail_as_before(body: bytes) -> None:
    s = _SETTINGS[0]
    assert outcome(App(s), body, "json", True) == outcome(App(s), body, "json", False)


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, values in HOSTILE_FIELDS.items() for v in values]
)
@pytest.mark.parametrize("place", [0, 1])
def test_each_odd_json_id_or_time_decodes_or_fails_as_before(
    name: str, value: Any, place: int
) -> None:
    spans = [mcp("tools/call", "t", at_ns=NOW_NS - 60 * 10**9 + i) for i in range(2)]
    body = json.loads(as_json([({"service.name": "svc"}, spans)]))
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][place][name] = value
    raw = json.dumps(body).encode()
    s = _SETTINGS[0]
    assert outcome(App(s), raw, "json", True) == outcome(App(s), raw, "json", False)
